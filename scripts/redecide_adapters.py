"""Re-measure a finished run's ``adapters="auto"`` decision on its own validation split, part by part.

    python scripts/redecide_adapters.py RUN_DIR --out NEW_DIR [--ratios 0.9 0.8 ...] [--threads 1]

For runs made before the decision looked at each component of a mixture (``data=mix``): the run's
data group is rebuilt from its ``config.yaml`` (self-generated samples come from the acip cache, so
set ``ACIP_CACHE_DIR`` as the run had it), the validation split the run set aside is re-created
exactly (:func:`acip.train.run.run_validation_split`: the same seeded carve, never trained on), and
the run is exported at each ratio with and without its adapters and measured on the pooled split and
on each component's share (:func:`acip.finetune.decide_on_validation`, which applies
:func:`acip.export.auto.record_decision`). ``RUN_DIR`` is never written: it is copied to
``NEW_DIR``, and the parametrized model with the new decision is saved there (``acip.export(NEW_DIR,
ratio)`` follows it). Writes ``NEW_DIR/redecide.json``: both decisions and every validation figure.
Held-out text plays no part.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_header  # noqa: E402


def main() -> None:
    from omegaconf import OmegaConf

    import acip
    from acip.eval.perplexity import token_windows
    from acip.export.auto import PARTS_KEY, VAL_KEY, recorded_decisions
    from acip.finetune import decide_on_validation
    from acip.train.data import part_windows
    from acip.train.run import _build, run_validation_split, val_tokens

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="a new directory: the run copied, with the new decision")
    ap.add_argument("--ratios", type=float, nargs="+", default=None,
                    help="ratios to decide at (default: the run's recorded ones)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    run, out = args.run_dir.expanduser(), args.out.expanduser()
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{str(run)!r} holds no config.yaml: pass the directory of a finished acip.compress run")
    if out.exists():
        raise SystemExit(f"--out {str(out)!r} exists: name a new directory (the run itself is never written)")
    torch.set_num_threads(args.threads)
    print(machine_header(), flush=True)
    t0 = time.perf_counter()
    cfg = OmegaConf.load(run / "config.yaml")
    pm = acip.load(run)
    if pm.score_map is None or not pm.has_trained_adapters():
        raise SystemExit(f"{str(run)!r} has no score map or no trained adapters: there is nothing to decide")
    before = recorded_decisions(pm.score_map)
    ratios = sorted(args.ratios or [r for r in before if r < 1.0] or [0.9, 0.8, 0.7, 0.6, 0.5], reverse=True)
    _, tok = _build(cfg.model)
    train, _ = _build(cfg.data)
    _, val = run_validation_split(cfg, train, tok)  # the split the run set aside, exactly
    seq_len, n_win = int(cfg.eval.seq_len), val_tokens(cfg.eval) // int(cfg.eval.seq_len)
    val_w = token_windows(tok, val, seq_len, n_win)
    parts = part_windows(tok, val, seq_len, n_win)
    print(f"[redecide] {str(run)!r}: validation split of {len(val)} texts, {len(val_w)} windows pooled"
          + "".join(f", {p} {len(w)}" for p, w in parts.items()) + f" (x {seq_len} tokens)", flush=True)
    after = decide_on_validation(pm, val_w, ratios, parts=parts)
    shutil.copytree(run, out)
    pm.save_pretrained(out)
    meta = pm.score_map.meta
    report = {"run_dir": str(run), "out": str(out), "ratios": ratios,
              "before": {f"{r:g}": v for r, v in before.items()}, "after": after,
              "val": meta.get(VAL_KEY), "val_parts": meta.get(PARTS_KEY),
              "windows": {"val": len(val_w), **{p: len(w) for p, w in parts.items()}}, "seq_len": seq_len,
              "seconds": time.perf_counter() - t0}
    (out / "redecide.json").write_text(json.dumps(report, indent=2))
    print(f"{'ratio':>6} {'before':>7} {'after':>6}  " + "  ".join(f"{k:>24}" for k in ["val", *parts]))
    for r in ratios:
        key = f"{r:g}"
        cells = [meta[VAL_KEY][key]] + [meta[PARTS_KEY][p][key] for p in parts]  # pooled, then each part
        print(f"{r:6.2f} {str(before.get(r, '-')):>7} {str(after[key]):>6}  "
              + "  ".join(f"{c['adapters']:10.3f} vs {c['no_adapters']:10.3f}" for c in cells))
    print(f"[redecide] adapters with / without, per ratio; the new decision is saved in {str(out)!r} "
          f"({report['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
