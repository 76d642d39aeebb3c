"""Sampling speed on SmolLM2-135M: acip's static-KV-cache loop against HF ``generate``, side by side.

    python scripts/bench_sampling.py [--batch 64] [--new 64] [--threads 1] [--reps 1]

Every row samples ``--new`` tokens after BOS for a batch of ``--batch`` rows (temperature 1,
top-p 0.95; ``_topkN``: top-k N as well; ``_teacherK``: the loop also records the model's top-K
log-probabilities at every position, as ``data=self_generated data.teacher_topk=K`` does), interleaved
per repetition; tokens/s counts sampled tokens (median over reps).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import acip
from acip.train.sources import sample_tokens
from machine import machine_header  # scripts/machine.py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rows", nargs="+", default=["hf_generate", "static", "dynamic", "hf_generate_topk50",
                                                  "static_topk50"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_header(("transformers", "acip")))
    model, tok = acip.load_base("smollm2-135m")
    model.eval()
    res: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.reps):
        for B in args.batch:
            prefix = torch.full((B, 1), tok.bos_token_id or 0, dtype=torch.long)
            for row in args.rows:
                g = torch.Generator().manual_seed(0)
                t = time.perf_counter()
                k = int(row.split("_topk", 1)[1].split("_")[0]) if "_topk" in row else 0
                rec = int(row.rsplit("_teacher", 1)[1]) if "_teacher" in row else 0
                if row.startswith("hf_generate"):
                    with torch.inference_mode():
                        model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=True, top_p=0.95,
                                       temperature=1.0, top_k=k, max_new_tokens=args.new, min_new_tokens=args.new,
                                       pad_token_id=tok.eos_token_id)
                else:
                    sample_tokens(model, prefix, args.new, 1.0, 0.95, k, generator=g,
                                  cache="dynamic" if row == "dynamic" else "static", record_topk=rec)
                res.setdefault((row, B), []).append(B * args.new / (time.perf_counter() - t))
                print(row, B, f"{res[(row, B)][-1]:.1f} tok/s", flush=True)
    print(f"\n### Sampling {args.new} new tokens after BOS, temperature 1, top-p 0.95, {args.threads} thread(s)\n")
    print("| sampler | batch | tokens/s | vs HF generate (same top-k) |\n|---|---:|---:|---:|")
    for B in args.batch:
        for row in args.rows:
            hf = "hf_generate_topk50" if "_topk50" in row else "hf_generate"
            ref = statistics.median(res.get((hf, B), [float("nan")]))
            v = statistics.median(res[(row, B)])
            print(f"| {row} | {B} | {v:.0f} | {v / ref:.2f}x |")


if __name__ == "__main__":
    main()
