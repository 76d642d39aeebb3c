"""Quality of a finished ACIP run against the no-training baselines, on two text domains.

    python scripts/bench_quality.py RUN_DIR [--windows 8] [--calib 16] [--ratios 0.9 0.8 0.7 0.6 0.5]
                                           [--ceiling DIR_OF_bench_ceiling.py]

Rows, all on the same windows: fp32; ACIP exports (``acip.export`` from the run's score map, LoRA
folded); with ``acip_noad`` the same exports without the run's adapters (``adapters=False``);
the singular-value score map; the activation-aware (SVD-LLM whitened) score map calibrated on KJV
training windows. Domains: held-out KJV (the run trained on the first 90% of
verses) and Python's own documentation (``pydoc`` text of standard-library modules), never used
for training or calibration. With ``--ceiling`` (the output of ``scripts/bench_ceiling.py``) the dense
model with the run's LoRA tuning budget is one more row: the in-domain ceiling, evaluated with the
adapters saved at the first step >= the run's step count (or the last one saved, said so).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import pydoc
from pathlib import Path

import torch

import acip
from acip.eval import format_table, perplexity, ratio_sweep, token_windows
from machine import machine_header  # scripts/machine.py

PYDOC_MODULES = ["json", "re", "collections", "itertools", "functools", "pathlib", "argparse",
                 "logging", "subprocess", "dataclasses", "typing", "string", "textwrap", "csv"]


def pydoc_texts() -> list[str]:
    """Plain-text documentation of a fixed list of standard-library modules (deterministic)."""
    out = []
    for name in PYDOC_MODULES:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        out += [line for line in text.splitlines() if line.strip()]
    return out


def ceiling_adapters(ceiling_dir: Path, run_steps: int) -> tuple[Path, int]:
    """The saved adapters at the first step >= ``run_steps`` (else the last saved, with its step)."""
    saved = sorted(ceiling_dir.glob("adapters_*.safetensors"))
    if not saved:
        raise SystemExit(f"no adapters_*.safetensors in {ceiling_dir}; run scripts/bench_ceiling.py --out {ceiling_dir} first")
    steps = [int(p.stem.split("_")[1]) for p in saved]
    for p, st in zip(saved, steps):
        if st >= run_steps:
            return p, st
    return saved[-1], steps[-1]


def ceiling_model(base: torch.nn.Module, ceiling_dir: Path, run_steps: int) -> tuple[torch.nn.Module, str]:
    """A copy of ``base`` with the dense-LoRA adapters of ``bench_ceiling.py`` loaded (all of them)."""
    import json

    from safetensors.torch import load_file

    from bench_ceiling import lora_model

    meta = json.loads((ceiling_dir / "ceiling.json").read_text())
    path, step = ceiling_adapters(ceiling_dir, run_steps)
    model = lora_model(copy.deepcopy(base), int(meta["r"]), float(meta["alpha"]))
    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [k for k in params if params[k].requires_grad and k not in state]
    if missing or any(k not in params for k in state):
        raise SystemExit(f"{path} does not match the LoRA model (missing {missing[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    model.eval()
    note = "" if step >= run_steps else f", only {step} of {run_steps} steps"
    return model, f"dense + LoRA ceiling ({step} steps{note})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ceiling", type=Path, default=None, help="output dir of scripts/bench_ceiling.py")
    ap.add_argument("--label", default=None, help="column name of the ACIP run (default: run dir name)")
    ap.add_argument("--rows", default="acip,acip_noad,ceiling,sv,aa",
                    help="which rows to measure (fp32 always): acip, acip_noad (the run's map exported without its "
                         "adapters), ceiling, sv, aa; e.g. run the ceiling later on its own with --rows ceiling "
                         "(same windows: they are deterministic)")
    args = ap.parse_args()
    rows = set(args.rows.split(","))
    known = {"acip", "acip_noad", "ceiling", "sv", "aa"}
    if rows - known:
        raise SystemExit(f"--rows: unknown {sorted(rows - known)}; choose from {', '.join(sorted(known))}")
    torch.set_num_threads(args.threads)
    print(machine_header())
    cfg = acip.ScoreMap.load(args.run_dir).config
    base, tok = acip.load_base(cfg.source.model)
    pm = acip.ACIPModel.from_pretrained(args.run_dir, model=copy.deepcopy(base))  # the run, as trained
    sm = pm.score_map
    run_steps = int(sm.meta.get("global_step", 0))
    run_name = f"{args.label or Path(args.run_dir).name}, {run_steps} steps"
    train, held = acip.data.kjv_split()
    domains = {"KJV held-out": token_windows(tok, held, 256, args.windows),
               "Python pydoc": token_windows(tok, pydoc_texts(), 256, args.windows)}
    calib = token_windows(tok, train, 256, args.calib)
    results: dict[str, dict[str, dict[float, float]]] = {d: {} for d in domains}
    fp32 = {d: perplexity(base, tok, w, progress=False) for d, w in domains.items()}

    variants = [(f"ACIP ({run_name})", True)] if "acip" in rows else []
    variants += [(f"ACIP ({run_name}, no adapters)", False)] if "acip_noad" in rows else []
    for name, adapters in variants:  # real exports, the model a user gets
        for r in args.ratios:
            small = acip.export(pm, r, adapters=adapters)
            for d, w in domains.items():
                results[d].setdefault(name, {})[r] = perplexity(small, tok, w, progress=False)
            del small
            print(f"{name} {r}: " + ", ".join(f"{d} {results[d][name][r]:.4g}" for d in domains), flush=True)
    if args.ceiling is not None and "ceiling" in rows:
        ceil, name = ceiling_model(base, args.ceiling, run_steps)
        for d, w in domains.items():  # uncompressed: one figure, shown in every ratio row
            p = perplexity(ceil, tok, w, progress=False)
            results[d][name] = {r: p for r in args.ratios}
            print(f"{name}: {d} {p:.4g}", flush=True)
        del ceil

    if "sv" in rows:
        plain = acip.parametrize(copy.deepcopy(base), svd_dtype=torch.float32)
        sv = acip.ScoreMap.from_singular_values(plain)
        for d, w in domains.items():
            results[d]["singular values"] = ratio_sweep(plain, sv, tok, w, args.ratios)
        del plain
    if "aa" in rows:
        aa = acip.activation_aware(base, calib.split(4))
        for d, w in domains.items():
            results[d]["activation-aware (KJV calib)"] = ratio_sweep(aa, aa.score_map, tok, w, args.ratios)

    for d in domains:
        print(f"\n### {d}: perplexity ({args.windows} windows x 256 tokens), fp32 = {fp32[d]:.2f}\n")
        print(format_table(results[d], reference=fp32[d]))


if __name__ == "__main__":
    main()
