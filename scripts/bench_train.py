"""Step time of the parametrized SmolLM2 against the dense model, along the size ratio.

    python scripts/bench_train.py [--batch 4] [--seq-len 128] [--reps 5] [--threads 1]

One training step = forward + backward (+ AdamW step on the trainable tensors). Three dense
references: all weights train (forward + backward + AdamW); the same without the optimiser step
(forward + backward only); and the dense model with frozen weights and peft LoRA r=8 (the cost of
plain LoRA tuning). The parametrized model trains masks + LoRA (r=8, as the quickstart), with
directions pruned to each ratio by ``pm.prune`` (the forward then multiplies only active ranks).
All rows come from one run, interleaved per repetition; medians are reported, relative to the
first dense reference.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import acip
from machine import machine_header  # scripts/machine.py


def step(model: torch.nn.Module, opt: torch.optim.Optimizer | None, x: torch.Tensor) -> float:
    """Seconds for forward + backward (+ ``opt.step()`` unless ``opt`` is None)."""
    t = time.perf_counter()
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    if opt is not None:
        opt.step()
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_header(("transformers", "lightning", "acip")))
    model, tok = acip.load_base("smollm2-135m")
    train, _ = acip.data.kjv_split()
    x = acip.eval.token_windows(tok, train, args.seq_len, args.batch)
    dense = copy.deepcopy(model).train()
    for p in dense.parameters():
        p.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    dense_lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
    opt_l = torch.optim.AdamW([p for p in dense_lora.parameters() if p.requires_grad], lr=0.0)
    pm = acip.parametrize(model, lora={"r": 8, "lora_alpha": 16}, svd_dtype=torch.float32)
    pm.train()
    opt_d = torch.optim.AdamW(dense.parameters(), lr=0.0)
    opt_p = torch.optim.AdamW(pm.trainable_parameters(), lr=0.0)  # lr 0: masks stay put
    sm = acip.ScoreMap.from_singular_values(pm)
    rows: dict[str, list[float]] = {"dense": [], "fwdbwd": [], "lora": []} | {f"{r:.1f}": [] for r in args.ratios}
    step(dense, opt_d, x)  # warm-up
    step(dense_lora, opt_l, x)
    step(pm, opt_p, x)
    for _ in range(args.reps):
        rows["dense"].append(step(dense, opt_d, x))
        rows["fwdbwd"].append(step(dense, None, x))
        rows["lora"].append(step(dense_lora, opt_l, x))
        for r in args.ratios:
            pm.prune(r, sm)
            rows[f"{r:.1f}"].append(step(pm, opt_p, x))
        pm.unprune()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\n### Training step time, batch {args.batch} x {args.seq_len}, median of {args.reps} (same run)\n")
    print("| model | size ratio | step s | relative to dense |\n|---|---|---|---|")
    print(f"| dense (all weights train) | 1.00 | {med['dense']:.2f} | 1.00x |")
    print(f"| dense, forward + backward only (no optimiser step) | 1.00 | {med['fwdbwd']:.2f} | {med['fwdbwd'] / med['dense']:.2f}x |")
    print(f"| dense frozen + peft LoRA r=8 | 1.00 | {med['lora']:.2f} | {med['lora'] / med['dense']:.2f}x |")
    for r in args.ratios:
        k = f"{r:.1f}"
        print(f"| parametrized, masks + LoRA r=8 | {r:.2f} | {med[k]:.2f} | {med[k] / med['dense']:.2f}x |")


if __name__ == "__main__":
    main()
