"""The no-training path: SmolLM2 -> singular-value score map -> ratios 0.9..0.4 -> held-out KJV ppl.

    python scripts/baseline.py [--model smollm2-135m] [--windows 40] [--seq-len 256] [--out outputs/baseline]

Prints a markdown table and writes results.json, score_map.safetensors and ratio_vs_ppl.png.
Plain truncation collapses on this small model (ppl ~1e5 at 0.9): that is what training fixes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import acip
from acip.core.score_map import atomic_write
from acip.eval import format_table, perplexity, plot_ratio_curves, ratio_sweep, token_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    ap.add_argument("--out", default="outputs/baseline")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    model, tok = acip.load_base(args.model)
    _, held = acip.data.kjv_split()
    windows = token_windows(tok, held, args.seq_len, args.windows)
    dense = perplexity(model, tok, windows)
    pm = acip.parametrize(model)
    sm = acip.ScoreMap.from_singular_values(pm)
    sm.save(out / "score_map.safetensors")
    col = ratio_sweep(pm, sm, tok, windows, args.ratios)
    table = format_table({"singular values": col}, reference=dense)
    results = {"model": args.model, "windows": len(windows), "seq_len": args.seq_len, "dense": dense,
               "singular_values": {str(k): v for k, v in col.items()}}
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    plot_ratio_curves({"singular values": col}, out / "ratio_vs_ppl.png", reference=dense,
                      title=f"{args.model}: held-out KJV perplexity, no training")
    print(f"\nHeld-out KJV perplexity ({len(windows)} windows x {args.seq_len} tokens), {args.model}:\n")
    print(table)
    print(f"\nwrote {out}/results.json, score_map.safetensors, ratio_vs_ppl.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
