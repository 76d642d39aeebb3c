"""Where the bits go: our entropy quantizer against ideal ECSQ, decomposed, on a real model.

For each quantizer setting (``fmt`` at a target rate; ``lam`` is found from the rate) the script
quantizes every target linear of the model, saves it with ``save_pretrained`` and reads the
stored bytes back from the safetensors files, then reports, in bits per target weight:

* **stored** = codes stream + tables + scales + other, from the saved tensors: ``codes_stream``
  (the rANS payload), ``codes_table`` (the packed frequency tables), ``scales`` (per-row exponents
  or absmax scales) and other (one 32-byte sha256 per tensor, kept in the config).
  The stream is split into ``H_pooled`` (``sum_l n_l H_l / N``, the empirical entropy of each
  tensor's codes: what an ideal coder with the same per-tensor histogram pays), framing
  (the 4-byte initial state of every rANS stream of 4096 symbols) and coder loss
  (``stream - H_pooled - framing``: 12-bit frequency precision and rANS rounding).
* **H_row**: the codes' entropy with one histogram per row, ``sum_rows in * H_row / N`` (tables
  not counted); ``H_pooled - H_row`` bounds what per-row histograms could save, and ``row tables``
  is what they would cost (32-byte bitmap + 2 bytes per used symbol per row, the format's tables).
* **rel. RMS** ``sqrt(sum ||W - What||^2 / sum ||W||^2)`` over all target weights, and the task
  metric: held-out KJV perplexity (SmolLM2; ``--windows`` windows of 256 tokens as in
  bench_quant_bound.py, the first windows of the same list) or the cosine of mean-pooled
  embeddings to fp32 (MiniLM; ``--verses`` last held-out verses, as bench_quant.py).
* **ideal ECSQ at equal rel. RMS**: bench_quant_bound.py's ideal ECSQ (step ``c * sigma_row``, one
  global ``c``, entropy only; imported, not copied) with ``c`` solved so that its rel. RMS equals
  ours, its bits (entropy) and its task metric. ``grid`` = ``H_pooled - ECSQ bits``: what the code
  grid, the scales' granularity and the objective cost at equal error.

So ``gap = stored - ECSQ = grid + coder loss + framing + tables + scales + other`` exactly. The
gap at equal task metric is read off the ECSQ points of all settings of one model (piecewise
linear in bits against log ppl or cosine; ``--table`` merges the JSON of several runs).

Usage:
  python scripts/bench_ecsq_gap.py --model minilm --fmts e4m3,uniform --rates 4.2,3.2,2.6 --json a.json
  python scripts/bench_ecsq_gap.py --table a.json,b.json
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import acip  # noqa: E402
from acip import quant  # noqa: E402
from acip.quant.codec import SHA_BYTES, decode_many  # noqa: E402
from acip.quant.optimize import measure_rates  # noqa: E402
import bench_quant_bound as bound  # scripts/bench_quant_bound.py: the ideal ECSQ  # noqa: E402
from bench_quant import minilm_metric  # scripts/bench_quant.py: the MiniLM cosine protocol  # noqa: E402
from machine import machine_header  # noqa: E402

MODELS = ("minilm", "smollm2")
LAM_GRID = tuple(float(x) for x in np.geomspace(0.5, 400.0, 25))
PARTS = ("H_pooled", "grid", "coder", "framing", "tables", "scales", "other")


def load(model: str, windows: int, verses: int) -> tuple[nn.Module, Callable[[nn.Module], float], str]:
    """``(fp32 model, task metric, metric name)``: KJV perplexity (SmolLM2) or cosine to fp32 (MiniLM)."""
    if model not in MODELS:
        raise SystemExit(f"--model={model!r}: expected one of {list(MODELS)}")
    _, heldout = acip.data.kjv_split()
    if model == "smollm2":
        base, tok = acip.load_base("smollm2-135m")
        ids = acip.eval.token_windows(tok, heldout, seq_len=256, max_windows=windows)
        return base, (lambda m: acip.eval.perplexity(m, tok, ids, progress=False)), "ppl"
    base, cos = minilm_metric(verses)
    return base, cos, "cos"


def lam_for_rate(orig: dict[str, torch.Tensor], fmt: str, rate: float, rows: int = 128) -> float:
    """The lam whose predicted stored bits/weight (``measure_rates`` on ``rows`` sampled rows of
    every tensor: stream + table + sha256 + scales) is ``rate``, log-linear between grid points."""
    cfg = quant.EntropyQuantConfig(fmt=fmt)
    n = sum(w.numel() for w in orig.values())
    tot = np.zeros(len(LAM_GRID))
    for name, w in orig.items():
        r = measure_rates(w, LAM_GRID, rows=rows, name=name, base=cfg)
        tot += np.asarray(r["bits"]) * w.numel() + 8.0 * (np.asarray(r["fixed"]) + np.asarray(r["row_bytes"]) * w.shape[0])
    bits = tot / n  # falls as lam grows, until layers fall back to 8-bit absmax (max_rel_error)
    k = int(np.argmin(bits)) + 1
    bits, grid = np.minimum.accumulate(bits[:k]), np.log(LAM_GRID[:k])
    if not bits[-1] <= rate <= bits[0]:
        raise SystemExit(f"fmt={fmt}: rate {rate} is outside {bits[-1]:.2f}..{bits[0]:.2f} bits over lam "
                         f"{LAM_GRID[0]:g}..{LAM_GRID[k - 1]:g}")
    x = np.interp(-rate, -bits, grid)
    return float(math.exp(x))


def stored_bytes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per quantized layer: bytes of its ``codes_stream`` / ``codes_table`` / ``scales`` as saved
    (read from the safetensors files ``save_pretrained`` writes) and its sha256 (32 bytes)."""
    from safetensors import safe_open

    layers = quant.quantized_layers(model)
    out = {n: {"stream": 0, "tables": 0, "scales": 0, "other": SHA_BYTES} for n in layers}
    key = {"codes_stream": "stream", "codes_table": "tables", "scales": "scales"}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
        if not files:
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {d}")
        for f in files:
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    mod, _, leaf = k.rpartition(".")
                    for prefix in ("", "model.", "bert."):  # save_pretrained may add or drop a base prefix
                        n = mod[len(prefix):] if prefix and mod.startswith(prefix) else mod
                        if n in out and leaf in key:
                            t = st.get_slice(k)
                            numel = int(np.prod(t.get_shape())) if t.get_shape() else 1
                            out[n][key[leaf]] += numel * torch.empty(0, dtype=_dtype(t.get_dtype())).element_size()
                            break
    missing = [n for n, b in out.items() if b["stream"] == 0 and b["scales"] == 0]
    if missing:
        raise RuntimeError(f"{len(missing)} quantized layers not found in the saved files, e.g. {missing[:3]}")
    return out


def _dtype(name: str) -> torch.dtype:
    return {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16, "I64": torch.int64}[name]


def code_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per layer: weights, pooled and per-row code entropy (bits/weight), rANS state bytes,
    the bytes per-row tables would take, from the codes decoded back out of the coded streams."""
    layers = quant.quantized_layers(model)
    codes = decode_many([m.encoded() for m in layers.values()])
    out = {}
    for (name, m), c in zip(layers.items(), codes):
        c = c.to(torch.int64)
        n_out, n_in = c.shape
        h = torch.bincount(c.reshape(-1), minlength=256).double()
        p = h[h > 0] / c.numel()
        rows = torch.bincount((c + 256 * torch.arange(n_out)[:, None]).reshape(-1), minlength=256 * n_out)
        rows = rows.view(n_out, 256).double()
        pr = rows / n_in
        h_row = float(-(torch.where(rows > 0, pr * pr.clamp_min(1e-300).log2(), torch.zeros_like(pr))).sum()) / n_out
        rmeta = m.entry["codec"].get("rans", {})
        out[name] = {"n": float(c.numel()), "H_pooled": float(-(p * p.log2()).sum()), "H_row": h_row,
                     "state_bytes": 4.0 * int(rmeta.get("n_streams", 0)),
                     "row_table_bytes": float(n_out * 32 + 2 * int((rows > 0).sum()))}
    return out


@torch.no_grad()
def rel_rms(model: nn.Module, orig: dict[str, torch.Tensor]) -> float:
    layers = quant.quantized_layers(model)
    num = den = 0.0
    for name, w in orig.items():
        wq = layers[name].weight if name in layers else quant.target_linears(model)[name].weight
        num += float((wq.float() - w).pow(2).sum())
        den += float(w.pow(2).sum())
    return math.sqrt(num / den)


@torch.no_grad()
def ecsq_at_error(ecsq: nn.Module, orig: dict[str, torch.Tensor], target: float) -> tuple[float, float]:
    """``(c, rel. RMS)`` of ideal ECSQ (``bound.apply_ecsq``, applied in place to ``ecsq``'s target
    linears) with its rel. RMS equal to ``target``: the fixed point ``c <- c * target / err``
    (the error is about proportional to c), then bisection in log c if that has not converged."""
    lins = {n: m for n, m in quant.target_linears(ecsq).items() if n in orig}
    c, err = 0.3, 0.0
    for _ in range(8):
        err = bound.apply_ecsq(lins, orig, c)
        if abs(err / target - 1.0) < 2e-4:
            return c, err
        c *= target / err
    lo, hi = math.log(c / 2), math.log(c * 2)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        err = bound.apply_ecsq(lins, orig, math.exp(mid))
        if abs(err / target - 1.0) < 2e-4:
            break
        lo, hi = (mid, hi) if err < target else (lo, mid)
    return math.exp(mid), err


def measure(base: nn.Module, metric: Callable[[nn.Module], float], orig: dict[str, torch.Tensor], fmt: str,
            lam: float, ecsq: nn.Module, layers: str | None = None) -> dict[str, Any]:
    """One row: our quantizer at (fmt, lam) on the linears of ``orig`` (``layers``: their regex)
    decomposed, and ideal ECSQ at its rel. RMS on the same linears."""
    t = time.perf_counter()
    q = quant.quantize_(copy.deepcopy(base), quant.EntropyQuantConfig(
        lam=lam, fmt=fmt, target_modules=list(orig) if layers else None))
    sec = time.perf_counter() - t
    nb, st = stored_bytes(q), code_stats(q)
    n = sum(s["n"] for s in st.values())
    tot = {k: 8.0 * sum(b[k] for b in nb.values()) / n for k in ("stream", "tables", "scales", "other")}
    h_pooled = sum(s["H_pooled"] * s["n"] for s in st.values()) / n
    framing = 8.0 * sum(s["state_bytes"] for s in st.values()) / n
    err = rel_rms(q, orig)
    val = metric(q)
    fallbacks = quant.report(q).fallbacks
    del q
    c, e_err = ecsq_at_error(ecsq, orig, err)
    e_bits = bound.ecsq_bits(list(orig.values()), c)
    e_val = metric(ecsq)
    row = {"fmt": fmt, "lam": lam, "quantize_s": sec, "fallbacks": fallbacks,
           "stored": sum(tot.values()), "stream": tot["stream"], "tables": tot["tables"], "scales": tot["scales"],
           "other": tot["other"], "H_pooled": h_pooled, "framing": framing,
           "coder": tot["stream"] - h_pooled - framing,
           "H_row": sum(s["H_row"] * s["n"] for s in st.values()) / n,
           "row_tables": 8.0 * sum(s["row_table_bytes"] for s in st.values()) / n,
           "rel_rms": err, "metric": val,
           "ecsq_c": c, "ecsq_rel_rms": e_err, "ecsq_bits": e_bits, "ecsq_metric": e_val}
    row["grid"] = h_pooled - e_bits
    row["gap_rms"] = row["stored"] - e_bits
    return row


def ecsq_bits_at_metric(rows: list[dict], value: float, metric: str) -> tuple[float, bool]:
    """Ideal ECSQ bits at task metric ``value``, piecewise linear in (log ppl | cosine) between the
    ECSQ points of ``rows`` (sorted by bits); ``True`` when it had to extrapolate past the ends."""
    pts = sorted((r["ecsq_bits"], math.log(r["ecsq_metric"]) if metric == "ppl" else r["ecsq_metric"]) for r in rows)
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    v = math.log(value) if metric == "ppl" else value
    order = np.argsort(y)
    ys, xs = y[order], x[order]
    if ys[0] <= v <= ys[-1]:
        return float(np.interp(v, ys, xs)), False
    i = (0, 1) if v < ys[0] else (-2, -1)
    slope = (xs[i[1]] - xs[i[0]]) / (ys[i[1]] - ys[i[0]])
    return float(xs[i[0]] + slope * (v - ys[i[0]])), True


def table(runs: list[dict]) -> str:
    """Markdown: one block per model, one row per setting, every bit figure per target weight."""
    lines = []
    for model in MODELS:
        rows = [r for run in runs if run["model"] == model for r in run["rows"]]
        if not rows:
            continue
        metric = runs[[run["model"] for run in runs].index(model)]["metric"]
        lines += [f"\n{model} ({metric}; fp32 {rows[0].get('fp32', float('nan')):.4g})\n",
                  "| fmt | lam | stored | = stream | + tables | + scales | + other | H_pooled | H_row | "
                  f"coder | framing | rel. RMS | {metric} | ECSQ bits @rms | ECSQ {metric} | grid | gap @rms | "
                  "ECSQ bits @metric | gap @metric |",
                  "|" + "---|" * 19]
        for r in rows:
            b, extra = ecsq_bits_at_metric(rows, r["metric"], metric)
            r["ecsq_bits_metric"], r["gap_metric"] = b, r["stored"] - b
            fm = "{:.2f}" if metric == "ppl" else "{:.4f}"
            lines.append(
                f"| {r['fmt']} | {r['lam']:.3g} | {r['stored']:.3f} | {r['stream']:.3f} | {r['tables']:.4f} | "
                f"{r['scales']:.4f} | {r['other']:.4f} | {r['H_pooled']:.3f} | {r['H_row']:.3f} | {r['coder']:.4f} | "
                f"{r['framing']:.4f} | {r['rel_rms']:.4f} | {fm.format(r['metric'])} | {r['ecsq_bits']:.3f} | "
                f"{fm.format(r['ecsq_metric'])} | {r['grid']:+.3f} | {r['gap_rms']:+.3f} | "
                f"{b:.3f}{'*' if extra else ''} | {r['gap_metric']:+.3f} |")
    return "\n".join(lines) + "\n\n(* extrapolated past the ECSQ points)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm", help=f"one of {list(MODELS)}")
    ap.add_argument("--fmts", default="e4m3,uniform", help="EntropyQuantConfig.fmt values, comma-separated")
    ap.add_argument("--rates", default="4.2,3.2,2.6", help="target stored bits per weight (lam is solved for)")
    ap.add_argument("--lams", default=None, help="instead of --rates: fmt:lam pairs, e.g. e4m3:3.9,uniform:3.9")
    ap.add_argument("--windows", type=int, default=20, help="SmolLM2: KJV held-out windows of 256 tokens")
    ap.add_argument("--verses", type=int, default=512, help="MiniLM: last N held-out verses (0 = all)")
    ap.add_argument("--layers", default=None, help="a regex of target linears (full dotted name): quantize only "
                    "those, with ours and ideal ECSQ alike (the rest stays fp32)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--table", default=None, help="only print the table of these JSON files (comma-separated)")
    args = ap.parse_args()
    if args.table:
        runs = []
        for f in args.table.split(","):
            with open(f) as fh:
                runs.append(json.load(fh))
        print(table(runs))
        return
    if args.windows < 1 or args.verses < 0:
        raise SystemExit("--windows must be >= 1 and --verses >= 0")
    if args.lams:
        try:
            settings = [(p.split(":")[0], float(p.split(":")[1])) for p in args.lams.split(",")]
        except (IndexError, ValueError):
            raise SystemExit(f"--lams={args.lams!r}: expected fmt:lam pairs such as e4m3:3.9,uniform:3.9") from None
    else:
        try:
            rates = [float(r) for r in args.rates.split(",")]
        except ValueError:
            raise SystemExit(f"--rates={args.rates!r}: expected numbers such as 4.2,3.2,2.6") from None
        if not rates or any(not 1.0 <= r <= 8.0 for r in rates):
            raise SystemExit(f"--rates={args.rates!r}: give rates between 1 and 8 bits")
        settings = [(f, r) for f in args.fmts.split(",") for r in rates]
    for f, _ in settings:
        quant.EntropyQuantConfig(fmt=f)  # validates the name first
    torch.manual_seed(0)
    header = machine_header(("transformers", "acip"))
    print(header, f"\ncommand: python {' '.join(sys.argv)}", flush=True)
    base, metric, mname = load(args.model, args.windows, args.verses)
    targets = quant.target_linears(base)
    if args.layers:
        import re

        targets = {n: m for n, m in targets.items() if re.fullmatch(args.layers, n)}
        if not targets:
            raise SystemExit(f"--layers={args.layers!r} matches no target linear")
    orig = {n: lin.weight.detach().float().clone() for n, lin in targets.items()}
    print(f"{args.model}: {len(orig)} target linears, {sum(w.numel() for w in orig.values()) / 1e6:.2f}M weights",
          flush=True)
    fp32 = metric(base)
    ecsq = copy.deepcopy(base)
    rows = []
    for fmt, x in settings:
        t = time.perf_counter()
        lam = x if args.lams else lam_for_rate(orig, fmt, x)
        r = measure(base, metric, orig, fmt, lam, ecsq, args.layers)
        r["target_rate"] = None if args.lams else x
        r["fp32"] = fp32
        rows.append(r)
        print(f"  {fmt} lam={lam:.3g}: stored {r['stored']:.3f} bits (stream {r['stream']:.3f}, tables "
              f"{r['tables']:.4f}, scales {r['scales']:.4f}, other {r['other']:.4f}), H {r['H_pooled']:.3f}, "
              f"rel RMS {r['rel_rms']:.4f}, {mname} {r['metric']:.4f}; ideal ECSQ at that rel RMS "
              f"{r['ecsq_bits']:.3f} bits, {mname} {r['ecsq_metric']:.4f}; gap {r['gap_rms']:+.3f} "
              f"[{time.perf_counter() - t:.0f}s]", flush=True)
    run = {"header": header, "command": " ".join(sys.argv), "model": args.model, "metric": mname, "fp32": fp32,
           "windows": args.windows, "verses": args.verses, "layers": args.layers, "rows": rows}
    print(table([run]))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(run, fh, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
