"""Benchmark: what each rank holds under trainer=fsdp against trainer=ddp (issue 11, item 4).

Runs ``python -m acip.compress`` with two processes (gloo, CPU) once per strategy, on the same
overrides, and prints one table:

- SVD-factor elements held per rank: FSDP's own report (``[acip] fsdp shards {json}``,
  :class:`acip.train.scale.ShardReport`, measured from the tensors at the first optimiser step);
  DDP keeps every factor whole on every rank (``sum_l k_l (in_l + out_l)``: the FSDP report's total).
- per-rank host RSS, sampled from ``/proc/<pid>/status`` every 0.1 s: the peak over the whole run
  (VmHWM: load and parametrize included, which every rank does for the whole model before FSDP
  wraps it, and the final evaluation, which rank 0 runs with the whole model gathered) and the highest
  VmRSS between the run's first and last ``[acip] step`` lines (training).
- per rank, the gradient elements: of the model's own parameters (views) and of FSDP's flat
  parameters (``flat_param.grad``, what FSDP allocates: a flat parameter that holds any trainable
  tensor gets a gradient for all of it, frozen factors included).

Cases: ``ddp``, ``fsdp`` (factors sharded) and ``fsdp_whole`` (``trainer.strategy.shard_factors=false``:
the factors stay buffers, whole on every rank, as before they were sharded).

Run pinned and single-threaded (the numbers in docs/BENCHMARKS.md were made so):
  taskset -c 1 env OMP_NUM_THREADS=1 python scripts/bench_fsdp_memory.py [--cases ddp,fsdp,fsdp_whole] \
      [--model tiny|smollm2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
CASES = {"ddp": ["trainer=ddp", "trainer.devices=2"], "fsdp": FSDP,
         "fsdp_whole": FSDP + ["trainer.strategy.shard_factors=false"]}
# the tiny FSDP test's run (tests/test_fsdp_cpu.py), and a short SmolLM2-135M run without LoRA or evaluation
MODELS = {
    "tiny": ["experiment=tiny", "data.max_train_texts=1500", "data.max_heldout_texts=200", "acip.post_tune_steps=3",
             "eval.ratios=[0.5]", "eval.max_windows=2", "eval.val_windows=2"],
    "smollm2": ["model=smollm2_135m", "data=kjv", "data.max_train_texts=2000", "data.max_heldout_texts=200",
                "acip.lora=null", "acip.post_tune_steps=0", "acip.max_steps=6", "acip.log_every=1",
                "acip.checkpoint_every=1000", "acip.batch_size=2", "acip.seq_len=64", "acip.whiten_windows=0",
                "eval.enabled=false", "logger=none"],
}


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":")[0]
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def run_case(name: str, overrides: list[str], workdir: str) -> dict:
    """One run of the CLI; per rank: peak RSS, the highest RSS while training, and the shard report."""
    run_dir = os.path.join(workdir, name)
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "acip.compress", *overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: dict[int, list[tuple[float, int, int]]] = {}  # rank -> [(time, VmRSS, VmHWM)]
    while proc.poll() is None:
        for pid in [proc.pid] + _children(proc.pid):
            try:  # a rank runs this command line: rank 0 is the process started here, the others
                with open(f"/proc/{pid}/cmdline") as f:  # Lightning's launcher starts with LOCAL_RANK set
                    if "acip.compress" not in f.read():
                        continue
                with open(f"/proc/{pid}/environ") as f:
                    env_of = dict(kv.split("=", 1) for kv in f.read().split("\0") if "=" in kv)
            except OSError:
                continue
            rank = 0 if pid == proc.pid else int(env_of.get("LOCAL_RANK", -1))
            st = _status(pid)
            if st and rank >= 0:
                samples.setdefault(rank, []).append((time.perf_counter(), st.get("VmRSS", 0), st.get("VmHWM", 0)))
        time.sleep(0.1)
    reader.join(timeout=10)
    wall = time.perf_counter() - t0
    text = "".join(line for _, line in lines)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: acip.compress failed ({proc.returncode}):\n{text[-4000:]}")
    found = re.findall(r"^\[acip\] fsdp shards (\{.*\})$", text, flags=re.M)
    report = json.loads(found[0]) if found else None
    steps = [t for t, line in lines if line.startswith("[acip] step ")]
    if not steps:
        raise SystemExit(f"{name}: the run printed no '[acip] step' line; cannot tell when it trained")
    # training: from the first to the last monitoring line (the first one comes log_every steps in)
    per_rank = [{"rank": r, "peak_rss": max(h for _, _, h in ss),
                 "train_rss": max((v for t, v, _ in ss if steps[0] - 0.5 <= t <= steps[-1] + 0.5), default=0)}
                for r, ss in sorted(samples.items())]
    return {"name": name, "wall_s": wall, "report": report, "ranks": per_rank, "step_lines": len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="ddp,fsdp,fsdp_whole")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
    from machine import machine_header

    print(machine_header(("transformers", "lightning", "acip")))
    print(f"model: {args.model}; overrides: {' '.join(MODELS[args.model])}")
    results = []
    with tempfile.TemporaryDirectory(prefix="acip-fsdp-mem-") as work:
        for c in cases:
            results.append(run_case(c, MODELS[args.model] + CASES[c], work))
            print(f"# {c}: done in {results[-1]['wall_s']:.1f} s", flush=True)
    total = next((r["report"]["total"] for r in results if r["report"]), None)
    print("\n| case | rank | SVD-factor elements held | of all | factor MiB held | gradient elements (params) | "
          "flat params with grad | flat-param gradient elements | peak RSS MiB | RSS while training MiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rep = r["report"]
        for rk in r["ranks"]:
            i = rk["rank"]
            if rep is not None and i < len(rep["ranks"]):
                d = rep["ranks"][i]
                share = f"{100 * d['held'] / rep['total']:.1f}%"
                held_s, mib_s, grad_s, flat_s = (f"{d['held']:,}", f"{d['held_bytes'] / 2**20:.2f}",
                                                 f"{d['grad_numel']:,}",
                                                 f"{d['flat_params_with_grad']} | {d['flat_grad_numel']:,}")
            else:  # DDP: every factor whole on every rank (no report)
                held_s, share, mib_s, grad_s, flat_s = (f"{total:,} (whole)" if total else "whole"), "100%", "-", "-", "- | -"
            print(f"| {r['name']} | {i} | {held_s} | {share} | {mib_s} | {grad_s} | {flat_s} | "
                  f"{rk['peak_rss'] / 2**20:.0f} | {rk['train_rss'] / 2**20:.0f} | {r['wall_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
