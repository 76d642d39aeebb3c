"""The in-domain ceiling: the dense model LoRA-tuned with the same budget as an ACIP run.

    python scripts/bench_ceiling.py --steps 500 --out outputs/ceiling [--r 16 --alpha 16 --lr 5e-4]
    python scripts/bench_quality.py RUN_DIR --ceiling outputs/ceiling

Tuning on KJV adapts any model to KJV, so an ACIP model's KJV perplexity mixes compression loss
with adaptation gain. This script trains the *uncompressed* model with the same adapters (peft
LoRA on every decoder linear), the same optimiser (AdamW), learning rate, batches (the run's
``PackedTextDataModule`` with the same seed, seq_len and batch size) and number of steps, and saves
the adapters every ``--save-every`` steps, so ``bench_quality.py --ceiling`` evaluates it after
exactly the run's step count on the same windows. Nothing is compressed: the ceiling is what the
tuning budget alone buys. ``--run RUN_DIR`` tunes on that run's own training texts (any data group). Defaults are ``conf/acip/cpu_long.yaml``'s.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import acip
from machine import machine_header  # scripts/machine.py


def lora_model(base: torch.nn.Module, r: int, alpha: float) -> torch.nn.Module:
    """``base`` with peft LoRA (B = 0 at start) on every linear layer but the LM head."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear"))


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run", type=Path, default=None,
                    help="tune on the training texts of this ACIP run (its data group minus its validation split); "
                         "default: KJV's training verses")
    args = ap.parse_args()
    if args.steps < 1 or args.save_every < 1:
        raise SystemExit(f"--steps and --save-every must be >= 1, got {args.steps} and {args.save_every}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(machine_header(("transformers", "peft", "acip")))
    from acip.train.data import PackedTextDataModule, kjv_texts

    base, tok = acip.load_base("smollm2-135m")
    model = lora_model(base, args.r, args.alpha)
    model.train()
    if args.run is not None:
        from bench_quality import run_training_texts  # scripts/bench_quality.py

        train = run_training_texts(args.run, tok)
    else:
        train, _ = kjv_texts()
    dm = PackedTextDataModule(tok, train, args.seq_len, args.batch, args.steps, seed=args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in vars(args).items()}
    (args.out / "ceiling.json").write_text(json.dumps(meta, indent=1))
    t0 = time.perf_counter()
    bar = tqdm(dm.train_dataloader(), total=args.steps, desc="dense LoRA")
    for step, batch in enumerate(bar, start=1):
        ids = batch["input_ids"]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss.item()} at step {step}; lower --lr")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.save_every == 0 or step == args.steps:
            tmp = args.out / f".adapters_{step:05d}.tmp"
            save_file(adapter_state(model), str(tmp), metadata={"step": str(step)})
            tmp.replace(args.out / f"adapters_{step:05d}.safetensors")
        if step >= args.steps:
            break
    print(f"{args.steps} steps in {time.perf_counter() - t0:.0f} s; adapters in {args.out}")


if __name__ == "__main__":
    main()
