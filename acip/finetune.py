"""Fine-tune a finished run: after export at one ratio, or its own adapters at every ratio.

``python -m acip.finetune <run_dir> ratio=0.6 steps=200`` (``acip-finetune``, ``mode=export``)
exports the run at ``--ratio`` (``adapters="auto"`` unless ``--adapters`` says otherwise), puts a
LoRA adapter on every linear of the exported target layers (the ``down`` and ``up`` factors of each
``LowRankLinear``, or the layer itself where it was stored dense), trains only those adapters for
``--steps`` AdamW steps on the run's data (its ``config.yaml`` data group, else the KJV training
split) with the run's objective (its ``config.yaml`` objective group when it names one in
:mod:`acip.train.objectives`, else next-token cross-entropy), then merges them into the factors
and saves a plain exported model: same layout and size, ``acip.load(out)`` reads it (manifest
verified), ``AutoModelForCausalLM.from_pretrained(out)`` after ``import acip`` as well.

The LoRA here is acip's own few lines (:class:`LoRALinear`), so peft is not needed at run time;
a distillation objective's teacher is the run's parametrized model under ``dense_view()`` (the
uncompressed base model, no second copy of the dense weights). ``config.acip_export["finetune"]``
records the settings, the loss curve's ends and the held-out perplexity before and after.

``python -m acip.finetune <run_dir> mode=ratio_sampled steps=50`` post-tunes the run's *own* LoRA
adapters (masks and score map unchanged) with the pruning ratio sampled per step: before step
``t`` the model computes its export at ``rho_t = lo + (hi - lo) u_t`` (``u_t`` seeded by
``(seed, t)``, :func:`acip.train.schedule.sampled_ratio`; ``ratios=lo,hi``, default
``[stop_ratio, 1.0]``) through :meth:`acip.ACIPModel.at_ratio`, the same mechanism as a run's
``acip.post_tune_ratios``. The data is the run's training texts minus a seeded random
``val_fraction`` of them (:func:`acip.train.data.validation_split`), which is never trained on:
after training the ``adapters="auto"`` decision is re-measured on it at ``decide_ratios``
(exports with and without the adapters) and recorded in the score map
(:func:`acip.export.auto.record_decision`; ``meta["ratio_sampled"]`` holds the settings). The
result is an ``ACIPModel`` directory that ``acip.export`` / ``acip.load`` read.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora", "merge_lora", "finetune", "post_tune_sampled", "validation_texts",
           "decide_on_validation", "main", "build_parser"]


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with ``base`` frozen; ``B = 0`` at the start (exactly ``base``)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, seed: int = 0) -> None:
        super().__init__()
        self.base, self.r, self.scaling = base, int(r), float(alpha) / int(r)
        g = torch.Generator().manual_seed(seed)
        a = torch.empty(self.r, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        w = base.weight
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.r, device=w.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (self.scaling * delta).to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """``base`` with ``W + scaling * B A`` written into its weight (in its own dtype)."""
        w = self.base.weight
        w.copy_((w.float() + self.scaling * (self.lora_B @ self.lora_A)).to(w.dtype))
        return self.base


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears of the exported target layers (``acip_layout``): factors of low-rank layers, dense ones."""
    from acip.core.lowrank import LowRankLinear

    layout = getattr(model.config, "acip_layout", None) or {}
    if not layout:
        raise ValueError("this model has no acip_layout: fine-tune an exported model (acip.export(run_dir, ratio))")
    out: dict[str, nn.Linear] = {}
    for name in layout:
        mod = model.get_submodule(name)
        if isinstance(mod, LowRankLinear):
            if mod.rank > 0:
                out[f"{name}.down"], out[f"{name}.up"] = mod.down, mod.up
        elif isinstance(mod, nn.Linear):
            out[name] = mod
        else:
            raise TypeError(f"{name}: a {type(mod).__name__} cannot take a LoRA adapter here (quantized? fine-tune "
                            f"before quantizing)")
    return out


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, seed: int = 0) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap every target linear (see :func:`_targets`) in a :class:`LoRALinear`, in place."""
    from acip.core.surgery import replace_module

    if r < 1:
        raise ValueError(f"--rank must be >= 1, got {r}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for i, (name, lin) in enumerate(_targets(model).items()):
        rr = min(r, lin.in_features, lin.out_features)
        wrapped[name] = LoRALinear(lin, rr, alpha * rr / r, seed=seed + i)
        replace_module(model, name, wrapped[name])
    return wrapped


def merge_lora(model: nn.Module, wrapped: dict[str, LoRALinear]) -> nn.Module:
    """Fold every adapter into its linear and put the plain linear back (the layout is unchanged)."""
    from acip.core.surgery import replace_module

    for name, lora in wrapped.items():
        replace_module(model, name, lora.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


class _Student:
    """The exported model as an objective's ``pm``; ``dense_view()`` routes calls to the run's uncompressed model."""

    def __init__(self, model: nn.Module, teacher: Any) -> None:
        self.model, self.teacher, self._dense = model, teacher, False

    def __call__(self, **kw: Any) -> Any:
        if self._dense:
            return self.teacher(**kw)
        return self.model(**kw)

    @contextlib.contextmanager
    def dense_view(self) -> Iterator["_Student"]:
        if self.teacher is None:
            raise ValueError("this objective needs a teacher: fine-tune from a run directory")
        with self.teacher.dense_view():
            self._dense = True
            try:
                yield self
            finally:
                self._dense = False


def _ce(student: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    logits = student(input_ids=ids).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss, {"ce": float(loss.detach())}


def finetune(model: nn.Module, windows: torch.Tensor, steps: int, *, lr: float = 1e-3, r: int = 8,
             alpha: float = 16.0, batch_size: int = 4, seed: int = 0, objective: Any = None, teacher: Any = None,
             log_every: int = 10, log: Any = print) -> dict[str, Any]:
    """Train LoRA adapters on ``model``'s target linears over ``windows`` (``(n, seq_len)`` ids), then merge.

    Batch ``t`` is rows ``perm[(t * batch_size) % n ...]`` of a seeded permutation (deterministic).
    Returns the record stored in ``config.acip_export["finetune"]``. ``model`` is changed in place.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(windows) < 1:
        raise ValueError("no training windows")
    objective = objective or _ce
    wrapped = add_lora(model, r=r, alpha=alpha, seed=seed)
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    student = _Student(model, teacher)
    model.train()
    t0 = time.perf_counter()
    try:
        losses = _train_loop(params, windows, steps, lambda ids: objective(student, ids)[0], lr=lr,
                             batch_size=batch_size, seed=seed, log_every=log_every, log=log, what="finetune")
    finally:
        model.eval()
        merge_lora(model, wrapped)
    k = max(1, min(10, steps // 4))
    return {"steps": steps, "lr": lr, "rank": r, "alpha": alpha, "batch_size": batch_size, "seq_len": int(windows.shape[1]),
            "seed": seed, "adapters": len(wrapped), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "time_s": time.perf_counter() - t0}


def _train_loop(params: list[torch.nn.Parameter], windows: torch.Tensor, steps: int, loss_of: Any, *, lr: float,
                batch_size: int, seed: int, log_every: int, log: Any, what: str, context: Any = None) -> list[float]:
    """AdamW on ``params`` for ``steps`` steps; step ``t`` minimises ``loss_of(ids)`` on rows
    ``perm[(t * batch_size) % n ...]`` of a seeded permutation of ``windows``, its forward and
    backward inside ``context(t)`` when given (a context manager). Returns the losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    device = params[0].device
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        ids = windows[perm[(torch.arange(batch_size) + step * batch_size) % len(windows)]].to(device)
        with context(step) if context is not None else contextlib.nullcontext():
            loss = loss_of(ids)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the {what} loss is {float(loss)} at step {step}: lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step % max(1, log_every) == 0 or step == steps - 1):
            log(f"[acip] {what} step {step + 1}/{steps} loss {losses[-1]:.4f} [{time.perf_counter() - t0:.0f}s]")
    return losses


def post_tune_sampled(pm: Any, windows: torch.Tensor, steps: int, ratios: tuple[float, float], *, lr: float = 1e-3,
                      batch_size: int = 4, seed: int = 0, objective: Any = None, log_every: int = 10,
                      log: Any = print) -> dict[str, Any]:
    """Train ``pm``'s own LoRA adapters with the ratio sampled per step; masks and score map untouched.

    Step ``t`` computes the loss of ``pm`` at ``rho_t = sampled_ratio(seed, t, lo, hi)`` (inside
    ``pm.at_ratio(rho_t)``: exactly the export at ``rho_t``, adapters included) and takes one AdamW
    step on the adapters only. ``pm`` is changed in place; returns the record saved in
    ``score_map.meta["ratio_sampled"]`` (the ratios drawn, the loss curve's ends).
    """
    from acip.train.schedule import check_ratio_bounds, sampled_ratio

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(windows) < 1:
        raise ValueError("no training windows")
    if pm.score_map is None:
        raise ValueError("this model has no score map to prune with: pass a trained run directory")
    lo, hi = check_ratio_bounds(ratios, "--ratios")
    params = pm.lora_parameters()
    if not params:
        raise ValueError("this run has no LoRA adapters to post-tune (acip.lora was null)")
    objective = objective or _ce
    for p in pm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    drawn: list[float] = []

    def at_sampled_ratio(step: int) -> Any:
        drawn.append(sampled_ratio(seed, step, lo, hi))
        return pm.at_ratio(drawn[-1], pm.score_map)

    pm.train()
    t0 = time.perf_counter()
    try:
        losses = _train_loop(params, windows, steps, lambda ids: objective(pm, ids)[0], lr=lr, batch_size=batch_size,
                             seed=seed, log_every=log_every, log=log, context=at_sampled_ratio,
                             what=f"ratio-sampled post-tune in [{lo:g}, {hi:g}]")
    finally:
        pm.eval()
        for p in params:
            p.requires_grad_(False)
    k = max(1, min(10, steps // 4))
    return {"steps": steps, "ratios": [lo, hi], "lr": lr, "batch_size": batch_size, "seq_len": int(windows.shape[1]),
            "seed": seed, "drawn": [round(r, 6) for r in drawn], "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k, "time_s": time.perf_counter() - t0}


def validation_texts(texts: Sequence[str], tokenizer: Any, fraction: float,
                     seed: int) -> tuple[Sequence[str], Sequence[str]]:
    """``(train_rest, val)``: a seeded random ``fraction`` of the training ``texts`` set aside (never trained on).

    :func:`acip.train.data.validation_split` with no token target, so the split is exactly
    ``int(len(texts) * fraction)`` texts (at least one), kept in text order; lists, or
    :class:`~acip.train.data.LabeledTexts` for a mixture's texts (labels kept).
    """
    from acip.train.data import validation_split

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1) (the share of the training texts set aside for "
                         f"validation), got {fraction!r}")
    rest, val = validation_split(texts, tokenizer, 10 ** 12, max_fraction=float(fraction), seed=int(seed))
    return rest, val


def decide_on_validation(pm: Any, windows: torch.Tensor, ratios: Sequence[float], log: Any = print,
                         parts: Mapping[str, torch.Tensor] | None = None) -> dict[str, bool]:
    """Re-measure ``adapters="auto"``: export ``pm`` at each ratio with and without its adapters, compare
    perplexity on the validation ``windows`` (and on each of ``parts``, ``{component: windows}`` of a
    mixture, :func:`acip.train.data.part_windows`) and record the decision in ``pm.score_map``
    (:func:`acip.export.auto.record_decision`: with parts, the adapters must help on every one).
    Returns it (``{"0.9": True, ...}``)."""
    from acip.export.auto import record_decision
    from acip.train.callbacks.final_eval import adapter_pairs, evaluate_score_maps, part_key

    sm = pm.score_map
    parts = dict(parts or {})
    maps = {"acip_adapters": (sm, {"adapters": True}), "acip_no_adapters": (sm, {"adapters": False})}
    wins = {"val": windows, **{part_key(p): w for p, w in parts.items()}}
    ppl = evaluate_score_maps(maps, wins, list(ratios), pm, log=log or (lambda *_: None))["ppl"]
    return record_decision(sm, adapter_pairs(ppl["val"], ratios),
                           {p: adapter_pairs(ppl[part_key(p)], ratios) for p in parts})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="acip-finetune",
        description="mode=export (default): export an ACIP run at one ratio, fine-tune LoRA adapters on the exported "
                    "factors, merge them and save a model that acip.load reads. mode=ratio_sampled: post-tune the "
                    "run's own adapters with the pruning ratio sampled per step, re-measure adapters='auto' on a "
                    "validation split of the training texts and save an ACIPModel directory (acip.export reads it).",
        epilog="Also accepted: python -m acip.finetune <run_dir> ratio=0.6 steps=200 (key=value for any option); "
               "python -m acip.finetune <run_dir> mode=ratio_sampled steps=50 ratios=0.5,1.0")
    ap.add_argument("run_dir", help="a finished run directory (python -m acip.compress)")
    ap.add_argument("--mode", choices=("export", "ratio_sampled"), default="export",
                    help="export: LoRA on the export at --ratio (default); ratio_sampled: the run's own adapters at "
                         "ratios sampled in --ratios per step")
    ap.add_argument("--ratio", type=float, default=None, help="mode=export: size ratio of the export, in (0, 1]")
    ap.add_argument("--ratios", type=str, default=None,
                    help="mode=ratio_sampled: 'lo,hi', the range each step's ratio is drawn from uniformly "
                         "(default: the run's stop ratio to 1.0)")
    ap.add_argument("--val-fraction", type=float, default=0.015,
                    help="mode=ratio_sampled: seeded random share of the training texts set aside (never trained "
                         "on) to re-measure adapters='auto' on (default 0.015)")
    ap.add_argument("--val-windows", type=int, default=16,
                    help="mode=ratio_sampled: validation windows of --eval-seq-len tokens (default 16)")
    ap.add_argument("--eval-seq-len", type=int, default=256, help="tokens per evaluation window (default 256)")
    ap.add_argument("--decide-ratios", type=str, default=None,
                    help="mode=ratio_sampled: ratios 'a,b,...' at which the adapters decision is measured (default: "
                         "the run's recorded ones, else 0.9,0.8,0.7,0.6,0.5)")
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the adapters (default 1e-3)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (capped at each factor's size; default 8)")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha/r; default 16)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per training window (default 128)")
    ap.add_argument("--data", choices=("run", "kjv"), default="run",
                    help="'run': the run's config.yaml data group (default; KJV if it has none); 'kjv': the KJV "
                         "training split")
    ap.add_argument("--objective", choices=("run", "ce"), default="run",
                    help="'run': the run's objective (config.yaml; CE if none); 'ce': next-token cross-entropy")
    ap.add_argument("--adapters", choices=("auto", "true", "false"), default="auto",
                    help="the run's own adapters in the export (acip.export's adapters=; default auto)")
    ap.add_argument("--eval-windows", type=int, default=8,
                    help="held-out windows for the perplexity before and after (0 = skip; default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default <run_dir>/finetune_r<ratio>, mode=ratio_sampled: "
                         "<run_dir>/ratio_sampled)")
    return ap


def _run_config(run_dir: Path) -> Any:
    f = run_dir / "config.yaml"
    if not f.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(f)


def _instantiate(node: Any) -> Any:
    from acip.train.run import _build  # hydra's instantiate, re-raising the target's own error

    return _build(node)


def _texts(cfg: Any, which: str) -> tuple[list[str], list[str], str]:
    """(train, held-out, description) for ``--data``."""
    if which == "run" and cfg is not None and cfg.get("data") is not None:
        got = _instantiate(cfg.data)
        if (isinstance(got, tuple) and len(got) == 2 and all(isinstance(x, list) for x in got)
                and all(isinstance(t, str) for x in got for t in x[:3])):
            return got[0], got[1], str(cfg.data.get("_target_"))
        raise ValueError(f"the run's data group ({cfg.data.get('_target_')}) does not give (train texts, held-out "
                         f"texts); pass --data kjv")
    from acip.data import kjv_split

    train, held = kjv_split()
    return train, held, "kjv"


def _objective(cfg: Any, which: str) -> tuple[Any, str]:
    if which == "run" and cfg is not None and cfg.get("objective") is not None:
        target = str(cfg.objective.get("_target_", ""))
        if target.startswith("acip.train.objectives."):
            try:
                obj = _instantiate(cfg.objective)
            except (ImportError, AttributeError) as e:
                print(f"[acip] the run's objective {target} is not available here ({e}); using cross-entropy",
                      flush=True)
            else:
                return obj, getattr(obj, "name", target)
    return _ce, "ce"


def main(argv: Sequence[str] | None = None) -> Path:
    """Export, fine-tune, merge, save; prints the held-out perplexity before and after."""
    ap = build_parser()
    from acip.cli.export import modernise_argv  # ``ratio=0.6`` -> ``--ratio=0.6``, one rule for both CLIs

    args = ap.parse_args(modernise_argv(sys.argv[1:] if argv is None else argv))
    for key in ("steps", "rank", "batch_size"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.seq_len < 2:
        ap.error(f"--seq-len must be >= 2, got {args.seq_len}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    if args.mode == "export":
        if args.ratio is None:
            ap.error("mode=export needs --ratio (the export's size ratio, e.g. ratio=0.6)")
        if not 0.0 < args.ratio <= 1.0:
            ap.error(f"--ratio must be in (0, 1], got {args.ratio}")
    elif args.ratio is not None:
        ap.error(f"mode=ratio_sampled trains for every ratio; --ratio={args.ratio} has no meaning there (use "
                 f"ratios=lo,hi for the sampled range)")
    elif args.val_windows < 1 or args.eval_seq_len < 2:
        ap.error(f"--val-windows must be >= 1 and --eval-seq-len >= 2, got {args.val_windows}, {args.eval_seq_len}")
    import json

    import acip
    from acip.core.base import load_base
    from acip.core.config import ACIPConfig
    from acip.core.parametrize import STATE_FILE, ACIPModel
    from acip.eval.perplexity import perplexity, token_windows

    run_dir = Path(args.run_dir).expanduser()
    if not (run_dir / STATE_FILE).is_file():
        ap.error(f"{str(run_dir)!r} holds no {STATE_FILE}: pass the directory of a finished run")
    torch.manual_seed(args.seed)
    config = ACIPConfig.from_dict(json.loads((run_dir / "acip_config.json").read_text())["config"])
    if not config.source.model:
        ap.error(f"{str(run_dir)!r} was saved from a model object (no base model recorded): export it in Python "
                 f"and call acip.finetune.finetune(model, windows, steps)")
    base, tok = load_base(config.source.model, dtype=getattr(torch, config.source.dtype))
    if tok is None:
        ap.error(f"the base model {config.source.model!r} has no tokenizer")
    pm = ACIPModel.from_pretrained(run_dir, model=base)
    if args.mode == "ratio_sampled":
        return _ratio_sampled(ap, args, run_dir, pm, tok)
    adapters: Any = {"auto": "auto", "true": True, "false": False}[args.adapters]
    model = acip.export(pm, args.ratio, adapters=adapters)
    cfg = _run_config(run_dir)
    train, held, data_name = _texts(cfg, args.data)
    objective, obj_name = _objective(cfg, args.objective)
    need = args.steps * args.batch_size
    windows = token_windows(tok, train, args.seq_len, need)
    held_w = token_windows(tok, held, args.seq_len, args.eval_windows) if args.eval_windows > 0 else None
    before = perplexity(model, None, held_w, progress=False) if held_w is not None else None
    print(f"[acip] fine-tuning the export at ratio {args.ratio} (adapters={model.config.acip_export['adapters']}) "
          f"on {data_name} ({len(windows)} windows of {args.seq_len} tokens) with {obj_name}", flush=True)
    record = finetune(model, windows, args.steps, lr=args.lr, r=args.rank, alpha=args.alpha,
                      batch_size=args.batch_size, seed=args.seed, objective=objective,
                      teacher=pm if getattr(objective, "uses_teacher", False) else None, log_every=args.log_every)
    after = perplexity(model, None, held_w, progress=False) if held_w is not None else None
    record.update(data=data_name, objective=obj_name, heldout_ppl_before=before, heldout_ppl_after=after,
                  heldout_windows=0 if held_w is None else len(held_w))
    model.config.acip_export["finetune"] = record
    out = args.out or run_dir / f"finetune_r{int(round(100 * args.ratio))}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if held_w is not None:
        print(f"[acip] held-out perplexity {before:.3f} -> {after:.3f} ({len(held_w)} windows)", flush=True)
    print(f"[acip] fine-tuned model (adapters merged, ratio {acip.size_ratio(model):.4f}) -> {out}", flush=True)
    return out


def _floats(text: str, key: str, ap: argparse.ArgumentParser) -> list[float]:
    try:
        return [float(x) for x in str(text).strip("[]()").split(",") if x.strip()]
    except ValueError:
        ap.error(f"--{key} must be comma-separated numbers, e.g. {key}=0.5,1.0; got {text!r}")
        raise  # unreachable: ap.error exits


def _ratio_sampled(ap: argparse.ArgumentParser, args: argparse.Namespace, run_dir: Path, pm: Any, tok: Any) -> Path:
    """``mode=ratio_sampled``: post-tune, re-measure ``adapters="auto"`` on the validation split, save the ACIPModel."""
    import shutil

    from acip.core.size import check_ratio
    from acip.eval.perplexity import token_windows
    from acip.export.auto import recorded_decisions
    from acip.train.data import part_windows
    from acip.train.schedule import check_ratio_bounds

    if pm.score_map is None:
        ap.error(f"{str(run_dir)!r} holds no score map: pass the directory of a trained run")
    if not pm.lora_parameters():
        ap.error(f"{str(run_dir)!r} has no LoRA adapters (acip.lora was null): nothing to post-tune")
    try:
        bounds = check_ratio_bounds("uniform" if args.ratios is None else _floats(args.ratios, "ratios", ap),
                                    "--ratios", pm.score_map.stop_ratio)
        decide = ([check_ratio(r, "--decide-ratios") for r in _floats(args.decide_ratios, "decide-ratios", ap)]
                  if args.decide_ratios else sorted(recorded_decisions(pm.score_map), reverse=True)
                  or [0.9, 0.8, 0.7, 0.6, 0.5])
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out or run_dir / "ratio_sampled").expanduser()
    if out.resolve() == run_dir.resolve():
        ap.error("--out is the run directory itself: write the post-tuned model elsewhere (e.g. <run_dir>/ratio_sampled)")
    cfg = _run_config(run_dir)
    train, _, data_name = _texts(cfg, args.data)
    train, val = validation_texts(train, tok, args.val_fraction, args.seed)
    objective, obj_name = _objective(cfg, args.objective)
    windows = token_windows(tok, train, args.seq_len, args.steps * args.batch_size)
    val_w = token_windows(tok, val, args.eval_seq_len, args.val_windows)
    val_parts = part_windows(tok, val, args.eval_seq_len, args.val_windows)  # a mixture: each component too
    print(f"[acip] ratio-sampled post-tuning of {str(run_dir)!r}'s adapters, ratio ~ U[{bounds[0]:g}, {bounds[1]:g}] "
          f"per step, on {data_name} ({len(windows)} windows of {args.seq_len} tokens, {len(val)} of {len(val) + len(train)} "
          f"texts set aside for validation) with {obj_name}", flush=True)
    record = post_tune_sampled(pm, windows, args.steps, bounds, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                               objective=objective, log_every=args.log_every)
    before = recorded_decisions(pm.score_map)
    decision = decide_on_validation(pm, val_w, decide, parts=val_parts)
    record.update(data=data_name, objective=obj_name, run_dir=str(run_dir),
                  validation={"split": "train", "fraction": args.val_fraction, "seed": args.seed, "texts": len(val),
                              "windows": len(val_w), "seq_len": args.eval_seq_len},
                  adapters_auto_before={f"{r:g}": v for r, v in before.items()})
    pm.score_map.meta["ratio_sampled"] = record
    pm.save_pretrained(out)
    if (run_dir / "config.yaml").is_file():  # its data and objective groups, for a later fine-tune or export
        shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
    tok.save_pretrained(out)
    print(f"[acip] adapters='auto' on the validation split: {decision} (before: "
          f"{record['adapters_auto_before'] or 'none recorded'})", flush=True)
    print(f"[acip] post-tuned ACIPModel (masks and score map unchanged) -> {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
