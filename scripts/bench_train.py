"""Step time of the parametrized SmolLM2 against the dense model, along the size ratio.

    python scripts/bench_train.py [--batch 4] [--seq-len 128] [--reps 5] [--threads 1]
                                  [--objectives ce kd ce_kd] [--only-objectives] [--teacher-topk 64]

One training step = forward + backward (+ AdamW step on the trainable tensors). Three dense
references: all weights train (forward + backward + AdamW); the same without the optimiser step
(forward + backward only); and the dense model with frozen weights and peft LoRA r=8 (the cost of
plain LoRA tuning). The parametrized model trains masks + LoRA (r=8, as the quickstart), with
directions pruned to each ratio by ``pm.prune`` (the forward then multiplies only active ranks).
All rows come from one run, interleaved per repetition; medians are reported, relative to the
first dense reference.

Objective rows: one training step of the parametrized model (masks + LoRA r=8, pruned to ratio 0.8
so that student and teacher differ) with each task loss of ``acip.train.objectives`` on the same
batch (``kd`` / ``ce_kd`` add the teacher forward under ``pm.dense_view()``), step time relative to
``ce``, and the peak resident memory above the step's starting RSS (sampled every 2 ms). With
``--teacher-topk K`` the distillation objectives also run against the cached teacher top-K (rows
``kd+topK``, ``ce_kd+topK``): the base model's top-K log-probabilities of the same batch, computed
once before parametrizing and stored in float16, as ``data=self_generated`` caches them. The
``kd`` column is the KD term of each row's loss, and a last table compares, at the same ratio,
the KD of the dense teacher with the cached top-K in float32 and float16 storage.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import threading
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


def objective_step(pm, objective, opt, x: torch.Tensor, **teacher: torch.Tensor) -> tuple[float, float]:
    """Seconds and peak RSS increase (MB) of forward + backward + optimiser step with ``objective``."""
    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t = time.perf_counter()
    loss, _ = objective(pm, x, **teacher)
    loss.backward()
    opt.step()
    dt = time.perf_counter() - t
    done.set()
    th.join()
    pm.zero_grad(set_to_none=True)
    return dt, (peak[0] - start) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4])
    ap.add_argument("--objectives", nargs="*", default=["ce", "kd", "ce_kd"])
    ap.add_argument("--only-objectives", action="store_true", help="skip the dense and ratio rows")
    ap.add_argument("--teacher-topk", type=int, default=64, help="K of the cached-teacher rows (0: none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_header(("transformers", "lightning", "acip")))
    model, tok = acip.load_base("smollm2-135m")
    train, _ = acip.data.kjv_split()
    x = acip.eval.token_windows(tok, train, args.seq_len, args.batch)
    if args.only_objectives:
        return objective_rows(model, x, args, teacher=cached_teacher(model, x, args.teacher_topk))
    dense = copy.deepcopy(model).train()
    for p in dense.parameters():
        p.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    teacher = cached_teacher(model, x, args.teacher_topk)  # before parametrize replaces the dense layers
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

    if args.objectives:
        objective_rows(pm.model, x, args, pm=pm, teacher=teacher)


def cached_teacher(model, x: torch.Tensor, k: int) -> dict[str, torch.Tensor] | None:
    """The base model's top-``k`` at every position of ``x`` (fp32), as ``data=self_generated`` records it."""
    if not k:
        return None
    from acip.train.sources import topk_logprobs

    ids, logp = topk_logprobs(model, x, k)
    return {"teacher_ids": ids, "teacher_logp": logp}


def objective_rows(model, x: torch.Tensor, args, pm=None, teacher=None) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "objective"
    objs = {name: instantiate(OmegaConf.load(conf / f"{name}.yaml")) for name in args.objectives}
    kwargs: dict[str, dict] = {name: {} for name in objs}
    if teacher is not None:  # the cached rows, float16 storage (the data.teacher_dtype default)
        stored = {"teacher_ids": teacher["teacher_ids"], "teacher_logp": teacher["teacher_logp"].half()}
        for name in list(objs):
            if getattr(objs[name], "uses_teacher", False):
                objs[f"{name}+top{args.teacher_topk}"] = objs[name]
                kwargs[f"{name}+top{args.teacher_topk}"] = stored
    if pm is None:
        pm = acip.parametrize(model, lora={"r": 8, "lora_alpha": 16}, svd_dtype=torch.float32)
    pm.train()
    trainable = list(pm.mask_parameters()) + list(pm.lora_parameters())
    for p in pm.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=0.0)
    pm.prune(0.8, acip.ScoreMap.from_singular_values(pm))
    times: dict[str, list[float]] = {n: [] for n in objs}
    mem: dict[str, list[float]] = {n: [] for n in objs}
    kd: dict[str, float] = {}
    for n, o in objs.items():  # warm-up
        objective_step(pm, o, opt, x, **kwargs[n])
    for _ in range(args.reps):
        for n, o in objs.items():
            dt, mb = objective_step(pm, o, opt, x, **kwargs[n])
            times[n].append(dt)
            mem[n].append(mb)
    for n, o in objs.items():
        with torch.no_grad():
            kd[n] = o(pm, x, **kwargs[n])[1].get("kd", float("nan"))
    errors = {}
    if teacher is not None:  # the KD term at ratio 0.8 and at 1.0 (initialisation) for each teacher
        from acip.train.objectives import Distillation

        kd_obj = Distillation()
        for ratio in (0.8, 1.0):
            if ratio == 1.0:
                pm.unprune()
            with torch.no_grad():
                errors[ratio] = {"dense teacher (pm.dense_view())": kd_obj(pm, x)[1]["kd"],
                                 f"cached top-{args.teacher_topk}, float32": kd_obj(pm, x, **teacher)[1]["kd"],
                                 f"cached top-{args.teacher_topk}, float16": kd_obj(pm, x, **stored)[1]["kd"]}
    pm.unprune()
    med = {n: statistics.median(v) for n, v in times.items()}
    ref = med.get("ce", next(iter(med.values())))
    print(f"\n### Objectives: one step of the parametrized model (masks + LoRA r=8, pruned to 0.8), batch "
          f"{args.batch} x {args.seq_len}, median of {args.reps} (same run)\n")
    print("| objective | step s | relative to ce | peak RSS above the step's start, MB | kd term |\n"
          "|---|---:|---:|---:|---:|")
    for n in objs:
        print(f"| {n} | {med[n]:.2f} | {med[n] / ref:.2f}x | {statistics.median(mem[n]):.0f} | {kd[n]:.4g} |")
    if errors:
        print(f"\n### The KD term (T = 1, kd_weight 1) of the same batch against each teacher\n")
        print("| teacher | at ratio 0.8 | at ratio 1.0 (initialisation) |\n|---|---:|---:|")
        for name in errors[0.8]:
            print(f"| {name} | {errors[0.8][name]:.5g} | {errors[1.0][name]:.3g} |")


if __name__ == "__main__":
    main()
