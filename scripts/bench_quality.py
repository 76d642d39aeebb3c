"""Quality of finished ACIP runs against the no-training baselines, on several held-out domains.

    python scripts/bench_quality.py RUN_DIR [RUN_DIR ...] [--labels A B ...] [--windows 40]
        [--ratios 0.9 0.8 0.7 0.6 0.5] [--rows auto,adapters,noad,sv,aa,ceiling]
        [--domains kjv pydoc python_source] [--calib 16] [--ceiling DIR_OF_bench_ceiling.py]
        [--finetuned LABEL=MODEL_DIR ...] [--json OUT.json] [--png OUT.png]

Rows, all on the same windows (the first ``--windows`` windows of 256 tokens of each domain): fp32;
for every run: ``auto`` (``acip.export(run, ratio)`` with its default ``adapters="auto"``: the model
a user gets), ``adapters`` / ``noad`` (the same exports with the run's adapters forced on / off);
the singular-value score map; the activation-aware (SVD-LLM whitened) score map calibrated on
``--calib`` windows of the FIRST run's own training texts (its data group, minus the validation
split it set aside); ``--finetuned LABEL=DIR``: an ``acip.finetune`` output (evaluated at its
ratio only). Domains (``acip.eval.domains``): ``kjv`` (KJV's held-out split), ``pydoc`` and
``python_source`` (standard-library documentation and source), all never trained on, never used to
choose anything. With ``--ceiling`` (``scripts/bench_ceiling.py``'s output) the dense model with the
run's LoRA tuning budget is one more row (uncompressed: one figure in every ratio row).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import acip
from acip.eval import format_table, perplexity, ratio_sweep, token_windows
from machine import machine_header  # scripts/machine.py

from acip.eval.domains import EVAL_MODULES as PYDOC_MODULES  # noqa: E402  (one list: the benchmark's modules)
from acip.eval.domains import pydoc_texts  # noqa: E402,F401  (rendered in a fresh interpreter; bench_objectives imports it)


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


def run_training_texts(run_dir: str | Path, tok) -> list[str]:
    """The training texts the run trained on: its data group, minus the validation split it set aside."""
    from omegaconf import OmegaConf

    from acip.train.run import _build, run_validation_split

    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    train, _ = _build(cfg.data)
    if "val_fraction" in cfg.eval:  # a run from before the validation split came out of the training texts
        return list(train)
    return run_validation_split(cfg, train, tok)[0]


def main() -> None:
    import json

    from acip.eval.domains import resolve_domains
    from acip.eval.sweep import plot_domain_curves

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--labels", nargs="+", default=None, help="one name per run (default: the directory names)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--domains", nargs="+", default=["kjv", "pydoc", "python_source"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ceiling", type=Path, default=None, help="output dir of scripts/bench_ceiling.py")
    ap.add_argument("--finetuned", nargs="*", default=[], help="LABEL=DIR of an acip.finetune output")
    ap.add_argument("--finetuned-ratio", type=float, default=0.6, help="the ratio the --finetuned models were exported at")
    ap.add_argument("--rows", default="auto,noad,sv,aa",
                    help="per run: auto, adapters, noad; once: sv, aa, ceiling (fp32 always)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    rows = set(args.rows.split(","))
    known = {"auto", "adapters", "noad", "ceiling", "sv", "aa"}
    if rows - known:
        raise SystemExit(f"--rows: unknown {sorted(rows - known)}; choose from {', '.join(sorted(known))}")
    labels = args.labels or [Path(d).name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        raise SystemExit(f"--labels: {len(labels)} names for {len(args.run_dirs)} runs")
    finetuned = [f.split("=", 1) for f in args.finetuned]
    if any(len(f) != 2 for f in finetuned):
        raise SystemExit("--finetuned takes LABEL=DIR")
    torch.set_num_threads(args.threads)
    print(machine_header())
    cfg = acip.ScoreMap.load(args.run_dirs[0]).config
    base, tok = acip.load_base(cfg.source.model)
    texts = resolve_domains(args.domains, acip.data.kjv_split()[1])
    domains = {d: token_windows(tok, t, 256, args.windows) for d, t in texts.items()}
    results: dict[str, dict[str, dict[float, float]]] = {d: {} for d in domains}
    fp32 = {d: perplexity(base, tok, w, progress=False) for d, w in domains.items()}
    print("fp32: " + ", ".join(f"{d} {v:.3f}" for d, v in fp32.items()), flush=True)

    def measure(name: str, model: torch.nn.Module, r: float) -> None:
        for d, w in domains.items():
            results[d].setdefault(name, {})[r] = perplexity(model, tok, w, progress=False)
        print(f"{name} {r}: " + ", ".join(f"{d} {results[d][name][r]:.4g}" for d in domains), flush=True)

    run_steps = 0
    for label, run_dir in zip(labels, args.run_dirs):
        pm = acip.ACIPModel.from_pretrained(run_dir, model=copy.deepcopy(base))  # the run, as trained
        run_steps = run_steps or int(pm.score_map.meta.get("global_step", 0))
        variants = [(f"{label} auto", "auto")] if "auto" in rows else []
        variants += [(f"{label} adapters", True)] if "adapters" in rows else []
        variants += [(f"{label} no adapters", False)] if "noad" in rows else []
        for name, adapters in variants:  # real exports, the model a user gets
            for r in args.ratios:
                small = acip.export(pm, r, adapters=adapters)
                measure(name, small, r)
                del small
        del pm
    for label, d in finetuned:
        model = acip.load(d)
        measure(label, model, args.finetuned_ratio)
        del model
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
        calib = token_windows(tok, run_training_texts(args.run_dirs[0], tok), 256, args.calib)
        aa = acip.activation_aware(base, calib.split(4))
        name = f"activation-aware ({labels[0]} training text)"
        for d, w in domains.items():
            results[d][name] = ratio_sweep(aa, aa.score_map, tok, w, args.ratios)

    for d in domains:
        print(f"\n### {d}: perplexity ({args.windows} windows x 256 tokens), fp32 = {fp32[d]:.2f}\n")
        print(format_table(results[d], reference=fp32[d]))
        print("\nx fp32: " + "; ".join(f"{m}: " + ", ".join(f"{r:g} {v / fp32[d]:.2f}x" for r, v in sorted(
            c.items(), reverse=True)) for m, c in results[d].items()))
    if args.json:
        args.json.write_text(json.dumps({"fp32": fp32, "windows": args.windows, "runs": dict(zip(labels, args.run_dirs)),
                                         "ppl": {d: {m: {f"{r:g}": v for r, v in c.items()} for m, c in cols.items()}
                                                 for d, cols in results.items()}}, indent=2))
    if args.png:
        print(plot_domain_curves(results, args.png, references=fp32,
                                 title=f"perplexity by size ratio, {args.windows} windows x 256 tokens per domain"))


if __name__ == "__main__":
    main()
