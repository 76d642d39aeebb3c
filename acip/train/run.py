"""One ACIP training run from a resolved config: build, fit, evaluate. No Hydra in here.

``train(cfg, run_dir)`` is what ``python -m acip.compress`` calls with Hydra's output directory;
tests call it with a config from Hydra's compose API.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["train", "build", "find_checkpoint", "setup_wandb_env", "rank_from_env"]


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


def build(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Model, data, module, callbacks and trainer for ``cfg`` (validated up front)."""
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    import acip
    from .callbacks import (FinalEvaluation, Monitor, PostTuning, RegularizationSchedule, ScoreMapRecorder,
                            StopAtRatio)
    from .callbacks.stopping import check_stop_ratio
    from .data import PackedTextDataModule
    from .module import ACIPModule

    a = cfg.acip
    stop_ratio = check_stop_ratio(a.stop_ratio)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    train_texts, heldout_texts = instantiate(cfg.data)
    model, tok = instantiate(cfg.model, workdir=str(run_dir))
    if tok is None:
        raise ValueError(f"the model at {cfg.model.get('path')!r} came without a tokenizer; save one next to it")
    world = int(cfg.trainer.get("devices", 1) or 1) if str(cfg.trainer.get("strategy", "auto")).startswith(("ddp", "fsdp")) else 1
    total_steps = int(a.max_steps) + int(a.post_tune_steps)
    dm = PackedTextDataModule(tok, train_texts, a.seq_len, a.batch_size, total_steps, seed=int(cfg.seed), world_size=world)
    dm.prepare()  # fail early (dataset shorter than one batch) before any expensive SVD
    lora = OmegaConf.to_container(a.lora, resolve=True) if a.get("lora") else None
    targets = OmegaConf.to_container(a.target_modules) if OmegaConf.is_config(a.target_modules) else a.target_modules
    excludes = OmegaConf.to_container(a.exclude_modules) if OmegaConf.is_config(a.exclude_modules) else a.exclude_modules
    whitening = None
    if int(a.get("whiten_windows", 0) or 0) > 0:  # activation-aware basis: masks over the SVD of W L
        from acip.core.whiten import calibrate_whitening
        from acip.eval.perplexity import token_windows

        calib = token_windows(tok, train_texts, int(a.get("whiten_seq_len", 256)), int(a.whiten_windows))
        whitening = calibrate_whitening(model, calib.split(4), targets, excludes)
    pm = acip.parametrize(model, target_modules=targets, exclude_modules=excludes, mask_scaling=float(a.mask_scaling), lora=lora,
                          svd_dtype=getattr(torch, str(a.get("svd_dtype", "float64"))), whitening=whitening)
    module = ACIPModule(pm, lr=a.lr, lora_lr=a.lora_lr, weight_decay=a.weight_decay, l1_weight=a.l1_init)
    recorder = ScoreMapRecorder(run_dir, stop_ratio=stop_ratio, meta={"run_dir": str(run_dir)})
    stopper = StopAtRatio(stop_ratio, a.post_tune_steps)
    callbacks = [
        RegularizationSchedule(a.l1_init, a.reg_factor, a.reg_every),
        stopper,
        PostTuning(a.post_tune_steps),
        recorder,
        Monitor(run_dir, every=a.log_every, ranks_per_layer=cfg.get("log_ranks", True)),
    ]
    if cfg.eval.enabled:
        callbacks.append(FinalEvaluation(run_dir, recorder, tok, heldout_texts, list(cfg.eval.ratios), cfg.eval.seq_len,
                                         cfg.eval.max_windows, cfg.eval.baseline, stopper=stopper, calib_texts=train_texts,
                                         calib_windows=int(cfg.eval.get("activation_aware_windows", 0) or 0),
                                         no_adapters=bool(cfg.eval.get("no_adapters", True))))
    if cfg.get("debug", {}).get("step_delay_s", 0):
        callbacks.append(_step_delay(float(cfg.debug.step_delay_s)))
    ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=int(a.checkpoint_every), save_top_k=2, monitor="step", mode="max",
                           save_last=False)
    callbacks.append(ckpt)
    trainer = instantiate(cfg.trainer, max_steps=total_steps, callbacks=callbacks, logger=_logger(cfg, run_dir),
                          default_root_dir=str(run_dir), enable_checkpointing=True, use_distributed_sampler=False,
                          enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=int(a.log_every),
                          num_sanity_val_steps=0, max_epochs=-1, deterministic=cfg.get("deterministic", False))
    return {"trainer": trainer, "module": module, "datamodule": dm, "recorder": recorder, "pm": pm, "tokenizer": tok}


def _step_delay(seconds: float) -> Any:
    """Test-only callback: sleeps after every step so a test can kill the run mid-way."""
    import time

    import lightning.pytorch as pl

    class StepDelay(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            time.sleep(seconds)

    return StepDelay()


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Run (or resume) training in ``run_dir``; returns ``results.json``'s content on rank 0."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = find_checkpoint(run_dir) if cfg.get("resume") else None
    if cfg.get("resume") and ckpt_path is None:
        warnings.warn(f"resume={cfg.resume}: no readable checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    if rank_from_env() == 0:
        from acip.core.score_map import atomic_write

        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    parts = build(cfg, run_dir)
    trainer = parts["trainer"]
    try:
        trainer.fit(parts["module"], datamodule=parts["datamodule"], ckpt_path=str(ckpt_path) if ckpt_path else None)
    finally:  # close this run's W&B run, so that the next --multirun job starts its own
        if "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
            sys.modules["wandb"].finish()
    for cb in trainer.callbacks:
        if type(cb).__name__ == "FinalEvaluation":
            return cb.results
    return None
