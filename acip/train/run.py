"""One ACIP training run from a resolved config: validate, build, write, fit. No Hydra in here.

``train(cfg, run_dir)`` is what ``python -m acip.compress`` calls with Hydra's output directory;
tests call it with a config from Hydra's compose API. The order is fixed so that a config that
cannot run leaves nothing behind:

1. :func:`validate`: every number and the :class:`acip.ACIPConfig` of the ``acip`` group (cheap);
2. :func:`prepare`: text, model, packed data (too little text fails here), whitening, the
   parametrized model and the module (expensive, but writes nothing);
3. only then ``config.yaml``, the logger, the trainer, and the run itself.

A directory that already holds a run (``config.yaml`` or ``acip_config.json``) is only ever
continued by ``resume=<dir>``.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

__all__ = ["train", "build", "validate", "prepare", "attach_teacher", "acip_config", "find_checkpoint", "setup_wandb_env",
           "rank_from_env", "RunDirectoryError", "RUN_MARKERS", "parametrizer"]

RUN_MARKERS = ("config.yaml", "acip_config.json")  # a directory holding one of these holds a run


class RunDirectoryError(FileExistsError):
    """The run directory already holds a run and ``resume=`` was not given."""


def rank_from_env() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def setup_wandb_env(run_dir: Path) -> None:
    """Keep W&B's files inside the run directory; offline unless ``WANDB_MODE`` is set."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_DIR"] = str(run_dir)
    os.environ["WANDB_CACHE_DIR"] = str(run_dir / "wandb" / ".cache")
    os.environ["WANDB_DATA_DIR"] = str(run_dir / "wandb" / ".data")
    os.environ["WANDB_CONFIG_DIR"] = str(run_dir / "wandb" / ".config")
    os.environ.setdefault("WANDB_SILENT", "true")


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable Lightning checkpoint in ``<run_dir>/checkpoints`` (None if none)."""
    import torch

    ckdir = run_dir / "checkpoints"
    cands = sorted(ckdir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if ckdir.is_dir() else []
    for p in cands:
        try:
            torch.load(p, map_location="cpu", weights_only=False)
            return p
        except Exception as e:  # noqa: BLE001 - a checkpoint cut by SIGKILL: try the previous one
            warnings.warn(f"skipping unreadable checkpoint {p} ({type(e).__name__}: {e})")
    return None


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a directory that already holds a run (it would be overwritten)."""
    held = [m for m in RUN_MARKERS if (run_dir / m).is_file()]
    if held:
        raise RunDirectoryError(
            f"{str(run_dir)!r} already holds a run ({', '.join(held)}). Continue it with resume={run_dir}, or start "
            f"a new run elsewhere (leave hydra.run.dir out for a fresh outputs/<date>/<time> directory)."
        )


# ---------------------------------------------------------------------------------------- validation
def _container(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _int(section: Any, key: str, where: str, least: int) -> int:
    v = section.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"{where}.{key} must be an integer >= {least}, got {v!r}")
    return v


def _float(section: Any, key: str, where: str, positive: bool) -> float:
    v = section.get(key)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (v > 0 if positive else v >= 0)
    if not ok or v != v or v == float("inf"):
        raise ValueError(f"{where}.{key} must be a {'positive' if positive else 'non-negative'} finite number, "
                         f"got {v!r}")
    return float(v)


def acip_config(a: Any) -> Any:
    """The :class:`acip.ACIPConfig` that the Hydra ``acip`` group describes (validated)."""
    from acip.core.config import ACIPConfig, ConfigError

    try:
        return ACIPConfig(
            target_modules=_container(a.target_modules), exclude_modules=_container(a.get("exclude_modules")),
            mask_scaling=a.mask_scaling, lora=_container(a.get("lora")), svd_dtype=str(a.get("svd_dtype", "float64")),
            basis="activation_aware" if int(a.get("whiten_windows", 0) or 0) > 0 else "plain",
        )
    except ConfigError as e:
        raise ConfigError(f"acip.{e}") from None


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the whole config without building anything; ``{"schedule", "acip_config"}``."""
    from acip.core.size import check_ratio

    from .schedule import ACIPSchedule

    a = cfg.acip
    config = acip_config(a)
    schedule = ACIPSchedule.from_config(a, seed=int(cfg.seed))  # checks each value (post_tune_ratios too)
    if schedule.post_tune_steps > 0 and config.lora is None:
        raise ValueError(f"acip.post_tune_steps={schedule.post_tune_steps} trains only the LoRA adapters, but "
                         f"acip.lora is null: set acip.lora (e.g. {{r: 8, lora_alpha: 16}}) or acip.post_tune_steps=0")
    precision, dtype = str(cfg.trainer.get("precision", "32-true")), str(cfg.model.get("dtype", "float32"))
    if precision.endswith("-true") and precision[:-5] in ("bf16", "16") and dtype.replace("torch.", "") != (
            "bfloat16" if precision.startswith("bf16") else "float16"):
        want = "bfloat16" if precision.startswith("bf16") else "float16"
        raise ValueError(f"trainer.precision={precision} trains the model's own weights in {want}, but model.dtype="
                         f"{dtype}: load it in that dtype (model.dtype={want}), or use trainer.precision="
                         f"{precision[:-5]}-mixed to keep the {dtype} weights and compute in {want}")
    _float(a, "lr", "acip", positive=True)
    _float(a, "lora_lr", "acip", positive=False)
    _float(a, "weight_decay", "acip", positive=False)
    for key, least in (("seq_len", 2), ("batch_size", 1), ("log_every", 1), ("checkpoint_every", 1)):
        _int(a, key, "acip", least)
    if config.basis == "activation_aware":
        _int(a, "whiten_seq_len", "acip", 2)
    if cfg.eval.enabled:
        for r in cfg.eval.ratios:
            check_ratio(r, "eval.ratios")
        _int(cfg.eval, "seq_len", "eval", 2)
        if cfg.eval.get("max_windows") is not None:
            _int(cfg.eval, "max_windows", "eval", 1)
        _int(cfg.eval, "activation_aware_windows", "eval", 0)
    if "val_fraction" in cfg.eval:  # a config.yaml from before the validation split left the held-out split
        raise ValueError(f"eval.val_fraction={cfg.eval.val_fraction!r} (the share of the held-out split used for "
                         f"validation) is gone: the validation split is now set aside from the training texts "
                         f"(eval.val_max_fraction, eval.val_windows). Remove eval.val_fraction from the config")
    v = cfg.eval.get("val_max_fraction", 0.1)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
        raise ValueError(f"eval.val_max_fraction must be in (0, 1) (the most of the training texts set aside for "
                         f"validation), got {v!r}")
    if cfg.eval.get("val_windows") is not None:
        _int(cfg.eval, "val_windows", "eval", 1)
    return {"schedule": schedule, "acip_config": config}


# ---------------------------------------------------------------------------------------- building
def _build(node: Any) -> Any:
    """``hydra.utils.instantiate(node)``, re-raising the target's own error (Hydra wraps it in its repr)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, Exception):
            raise e.__cause__ from None
        raise


def _world(cfg: DictConfig) -> int:
    strategy = cfg.trainer.get("strategy", "auto")
    if OmegaConf.is_dict(strategy):  # trainer=fsdp: {_target_: acip.train.scale.fsdp_strategy, ...}
        strategy = str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    if str(strategy).startswith(("ddp", "fsdp")):
        return int(cfg.trainer.get("devices", 1) or 1)
    return 1


def prepare(cfg: DictConfig, run_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Text, model, data, parametrized model and module; writes nothing."""
    import lightning.pytorch as pl
    import torch

    from .data import PackedTextDataModule
    from .module import ACIPModule

    a, schedule, config = cfg.acip, plan["schedule"], plan["acip_config"]
    threads = cfg.get("num_threads") or a.get("num_threads")  # top level wins; null: torch's choice
    if threads:
        torch.set_num_threads(int(threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    train_texts, heldout_texts = _build(cfg.data)
    model, tok = _build(cfg.model)
    if tok is None:
        raise ValueError(f"the model at {cfg.model.get('path')!r} came without a tokenizer; save one next to it")
    from .data import calibration_texts  # a streamed dataset: its first texts, enough for calibration

    # The validation split comes out of the TRAINING data (never trained on): it chooses the adapters
    # per ratio and is the sweep's metric; the data group's held-out split is only measured.
    train_texts, val_texts = run_validation_split(cfg, train_texts, tok)

    calib_texts = calibration_texts(train_texts, tok, max(
        int(a.get("whiten_windows", 0) or 0) * int(a.get("whiten_seq_len", 0) or 0),
        int(cfg.eval.get("activation_aware_windows", 0) or 0) * int(cfg.eval.get("seq_len", 0) or 0)) + 1)
    dm = PackedTextDataModule(tok, train_texts, a.seq_len, a.batch_size, schedule.total_steps, seed=int(cfg.seed),
                              world_size=_world(cfg))
    dm.prepare()  # fail early (dataset shorter than one batch) before any expensive SVD
    calib = None
    if config.basis == "activation_aware":  # masks over the SVD of W L
        from acip.eval.perplexity import token_windows

        calib = token_windows(tok, calib_texts, int(a.whiten_seq_len), int(a.whiten_windows))
    objective = _build(cfg.objective) if cfg.get("objective") is not None else None
    teacher = None
    if getattr(objective, "uses_teacher", False) and getattr(objective, "teacher_topk", 0):
        def teacher(m: Any) -> None:  # the base model's top-k on the packed rows, before parametrizing
            attach_teacher(dm, m, objective.teacher_topk, objective.teacher_dtype, model_key=cfg.model)
    module = ACIPModule(None, lr=a.lr, lora_lr=a.lora_lr, weight_decay=a.weight_decay, schedule=schedule,
                        meta={"run_dir": str(run_dir)},
                        build=parametrizer(model, config, calib, torch.random.get_rng_state(), teacher=teacher),
                        objective=objective)
    return {"module": module, "datamodule": dm, "tokenizer": tok, "train_texts": calib_texts,
            "heldout_texts": heldout_texts, "val_texts": val_texts}


def attach_teacher(dm: Any, model: Any, k: int, dtype: str = "float16", model_key: Any = None) -> bool:
    """Give the packed rows of the datamodule ``dm`` the base model's top-``k`` (its ``extras``:
    ``teacher_ids`` / ``teacher_logp``) unless they carry a teacher already
    (:func:`acip.train.sources.packed_teacher_topk`; ``model``: the uncompressed model on its device).
    False for a streamed dataset (never packed whole: the objective runs the dense teacher every
    step) and for rows that already carry one."""
    from .sources import packed_teacher_topk

    seqs = dm.prepare()
    if seqs is None:
        print("[acip] streamed training data: no cached teacher top-k, the dense teacher runs every step", flush=True)
        return False
    if "teacher_ids" in dm.extras:
        return False
    ids, logp = packed_teacher_topk(model, seqs, int(k), dtype, model_key=model_key)
    dm.extras = {"teacher_ids": ids, "teacher_logp": logp}
    return True


def run_validation_split(cfg: Any, train_texts: Any, tokenizer: Any) -> tuple[Any, list[str]]:
    """``(train_rest, val_texts)``: what a run with config ``cfg`` sets aside from its training texts
    (:func:`acip.train.data.validation_split` with ``cfg.eval``'s settings and ``cfg.seed``); the one
    place the run and the benchmarks that re-create its split get it from."""
    from .data import validation_split

    e = cfg.eval
    return validation_split(train_texts, tokenizer, val_tokens(e), max_fraction=float(e.get("val_max_fraction", 0.1)),
                            seed=int(cfg.seed))


def val_tokens(e: Any) -> int:
    """Tokens the validation split holds: ``eval.val_windows`` (null: ``eval.max_windows``, or 40 when
    that is null too) windows of ``eval.seq_len`` tokens."""
    w = e.get("val_windows", None)
    w = e.get("max_windows", None) if w is None else w
    return int(40 if w is None else w) * int(e.seq_len)


def parametrizer(model: Any, config: Any, calib: Any = None, rng_state: Any = None,
                 teacher: Callable[[Any], None] | None = None) -> Any:
    """``build(device) -> ACIPModel`` for :meth:`ACIPModule.configure_model`: the activation-aware
    calibration (when ``calib`` windows are given) and the SVD of every target layer run on the
    training device, on each rank. ``rng_state`` (the CPU generator's state where the old in-line
    parametrization ran) makes the LoRA initialisation, and so the run, the same as before.
    ``teacher(model)``: called first with the still dense model on the device (the cached teacher
    top-k of the training rows is computed there)."""
    import inspect

    import torch

    import acip

    def build(device: Any) -> Any:
        device = torch.device(device)
        if rng_state is not None:
            torch.random.set_rng_state(rng_state)
        layerwise = "device" in inspect.signature(acip.parametrize).parameters
        if device.type != "cpu" and (calib is not None or teacher is not None or not layerwise):
            model.to(device)  # calibration and the teacher run the model (and the SVD follows its weights)
        if teacher is not None:
            teacher(model)
        whitening = None
        if calib is not None:
            from acip.core.whiten import calibrate_whitening

            whitening = calibrate_whitening(model, calib.to(device).split(4), config.target_modules,
                                            config.exclude_modules)
        kw = {"device": device} if layerwise else {}
        return acip.parametrize(model, config, whitening=whitening, **kw)

    return build


def _logger(cfg: DictConfig, run_dir: Path) -> Any:
    from hydra.utils import instantiate

    lc = cfg.get("logger")
    if lc is None or lc.get("_target_") in (None, "null", "none"):
        return False
    kw: dict[str, Any] = {"save_dir": str(run_dir)}
    if "WandbLogger" in str(lc._target_):
        setup_wandb_env(run_dir)
        idf = run_dir / "wandb_run_id.txt"
        if idf.is_file():
            kw.update(id=idf.read_text().strip(), resume="allow")
        else:
            import uuid

            rid = uuid.uuid4().hex[:12]
            idf.write_text(rid)
            kw["id"] = rid
        logger = instantiate(lc, **kw)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # rank 0 only
        return logger
    return instantiate(lc, **kw)


def make_trainer(cfg: DictConfig, run_dir: Path, parts: dict[str, Any]) -> Any:
    """Callbacks, logger and the Lightning trainer (the logger may write into ``run_dir``)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .callbacks import FinalEvaluation, Monitor, RunArtifacts

    a, schedule = cfg.acip, parts["module"].schedule
    callbacks: list[Any] = [RunArtifacts(run_dir), Monitor(run_dir, every=a.log_every, ranks_per_layer=cfg.get("log_ranks", True))]
    if cfg.eval.enabled:
        callbacks.append(FinalEvaluation.from_config(cfg, run_dir, parts))  # the eval: section
    if cfg.get("debug", {}).get("step_delay_s", 0):
        callbacks.append(_step_delay(float(cfg.debug.step_delay_s)))
    callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step{step:06d}",
                                     auto_insert_metric_name=False, every_n_train_steps=int(a.checkpoint_every),
                                     save_top_k=2, monitor="step", mode="max", save_last=False))
    return instantiate(cfg.trainer, max_steps=schedule.total_steps, callbacks=callbacks, logger=_logger(cfg, run_dir),
                       default_root_dir=str(run_dir), enable_checkpointing=True, use_distributed_sampler=False,
                       enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=int(a.log_every),
                       num_sanity_val_steps=0, max_epochs=-1, deterministic=cfg.get("deterministic", False))


def build(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """:func:`validate`, :func:`prepare` and the trainer, without running (nor writing ``config.yaml``)."""
    parts = prepare(cfg, run_dir, validate(cfg))
    parts["trainer"] = make_trainer(cfg, run_dir, parts)
    return parts


def _step_delay(seconds: float) -> Any:
    """Test-only callback: sleeps after every step so a test can kill the run mid-way."""
    import time

    import lightning.pytorch as pl

    class StepDelay(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            time.sleep(seconds)

    return StepDelay()


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Run (or, with ``resume``, continue) training in ``run_dir``; returns ``results.json``'s content on rank 0."""
    from acip.core.io import atomic_write

    run_dir = Path(run_dir).resolve()
    rank0, resume = rank_from_env() == 0, bool(cfg.get("resume"))
    if rank0 and not resume:
        check_new_run_dir(run_dir)
    parts = prepare(cfg, run_dir, validate(cfg))
    ckpt_path = find_checkpoint(run_dir) if resume else None
    if resume and ckpt_path is None:
        warnings.warn(f"resume={cfg.resume}: no readable checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    if rank0:
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    trainer = make_trainer(cfg, run_dir, parts)
    try:
        trainer.fit(parts["module"], datamodule=parts["datamodule"], ckpt_path=str(ckpt_path) if ckpt_path else None)
    finally:  # close this run's W&B run, so that the next --multirun job starts its own
        if "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
            sys.modules["wandb"].finish()
    for cb in trainer.callbacks:
        if type(cb).__name__ == "FinalEvaluation":
            return cb.results
    return None
