"""How good can ANY data-free weight quantizer be at a given bit rate on this model?

Two idealised rows per target rate R (bits per weight), next to fp32, all scored by held-out KJV
perplexity on the same windows as ``bench_quant.py``'s SmolLM2 table:

* **ideal ECSQ**: entropy-coded uniform scalar quantization. Every row i of every target linear
  gets the step ``Delta_i = c * sigma_i`` (sigma_i = the row's standard deviation, one global c,
  which is the MSE-optimal allocation across rows at high rate), codes ``q = round(W / Delta)``,
  dequant ``q * Delta``. ``c`` is bisected so that the codes' empirical entropy, weighted over all
  target weights, equals R. Only that entropy is counted: no tables, no scales, no chunking, so a
  real coder needs a little more. ECSQ is within 0.255 bits of the rate-distortion function
  (MSE) at high rate for any smooth source (Gish-Pierce).
* **Shannon lower bound (SLB) test channel**: what an ideal (infinite-dimensional) vector
  quantizer at rate R would do to each row, simulated. The distortion is the Shannon lower bound
  ``D = N_i * 2^(-2R)`` with ``N_i = 2^(2h) / (2 pi e)`` the row's entropy power (h, the
  differential entropy of the row-normalised weights of the tensor, is estimated from a
  fine-step histogram: ``h ~ H(round(W/delta)) + log2(delta)``); the reconstruction is the
  backward Gaussian channel ``W_hat = beta * W + sqrt(beta * D) * eps`` with
  ``beta = 1 - D / sigma_i^2``. No real quantizer reaches this distortion; it is a bound.

Both spend the same rate on every weight (no calibration data says which layers matter), and are
judged by perplexity, not MSE: if even the SLB row misses a quality target at rate R, no data-free
quantizer with a uniform rate reaches it (up to how well MSE predicts perplexity).

Usage: python scripts/bench_quant_bound.py [--rates 4.2,3.2,2.6] [--windows 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import acip  # noqa: E402
from acip import quant  # noqa: E402
from machine import machine_header  # scripts/machine.py  # noqa: E402


def code_entropy(codes: torch.Tensor) -> float:
    """Empirical entropy in bits per symbol of an integer tensor: -sum p log2 p."""
    flat = codes.reshape(-1).to(torch.int64)
    counts = torch.bincount(flat - flat.min()).double()
    p = counts[counts > 0] / flat.numel()
    return float(-(p * p.log2()).sum())


def ecsq_bits(weights: list[torch.Tensor], c: float) -> float:
    """Weighted mean entropy (bits/weight) of ``round(W / (c * sigma_row))`` over all tensors."""
    total = sum(w.numel() for w in weights)
    bits = 0.0
    for w in weights:
        sigma = w.std(dim=1, keepdim=True).clamp_min(1e-12)
        bits += code_entropy(torch.round(w / (c * sigma))) * w.numel()
    return bits / total


def solve_c(weights: list[torch.Tensor], rate: float) -> float:
    """Bisect log(c) so that the ECSQ entropy equals ``rate`` (entropy falls as c grows)."""
    lo, hi = math.log(1e-3), math.log(50.0)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if ecsq_bits(weights, math.exp(mid)) > rate:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def entropy_power_ratio(w: torch.Tensor, delta: float = 1.0 / 256) -> float:
    """N / sigma^2 of the row-normalised weights, N = 2^(2h)/(2 pi e), h from a fine histogram.

    1.0 for a Gaussian, e/pi ~ 0.865 for a Laplacian; smaller means easier to compress."""
    z = w / w.std(dim=1, keepdim=True).clamp_min(1e-12)
    h = code_entropy(torch.round(z / delta)) + math.log2(delta)
    return 2.0 ** (2.0 * h) / (2.0 * math.pi * math.e)


@torch.no_grad()
def apply_ecsq(lins: dict[str, nn.Linear], orig: dict[str, torch.Tensor], c: float) -> float:
    """Quantize every target linear in place from ``orig``; returns the relative RMS error."""
    num = den = 0.0
    for name, lin in lins.items():
        w = orig[name]
        step = c * w.std(dim=1, keepdim=True).clamp_min(1e-12)
        wq = torch.round(w / step) * step
        lin.weight.copy_(wq)
        num += float((wq - w).pow(2).sum())
        den += float(w.pow(2).sum())
    return math.sqrt(num / den)


@torch.no_grad()
def apply_slb(lins: dict[str, nn.Linear], orig: dict[str, torch.Tensor], npr: dict[str, float],
              rate: float, seed: int = 0) -> float:
    """Backward Gaussian test channel at the Shannon lower bound; returns the relative RMS error."""
    gen = torch.Generator().manual_seed(seed)
    num = den = 0.0
    for name, lin in lins.items():
        w = orig[name]
        var = w.var(dim=1, keepdim=True).clamp_min(1e-24)
        d = npr[name] * var * 2.0 ** (-2.0 * rate)
        beta = 1.0 - d / var
        eps = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        wq = w.mean(dim=1, keepdim=True) + beta * (w - w.mean(dim=1, keepdim=True)) + (beta * d).sqrt() * eps
        lin.weight.copy_(wq)
        num += float((wq - w).pow(2).sum())
        den += float(w.pow(2).sum())
    return math.sqrt(num / den)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="4.2,3.2,2.6")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if not rates or any(not 0.5 <= r <= 8.0 for r in rates):
        raise SystemExit(f"--rates={args.rates!r}: give bit rates between 0.5 and 8, e.g. 4.2,3.2,2.6")
    torch.manual_seed(0)
    print(machine_header(("transformers", "acip")), flush=True)

    model, tok = acip.load_base("smollm2-135m")
    _, heldout = acip.data.kjv_split()
    ids = acip.eval.token_windows(tok, heldout, seq_len=256, max_windows=args.windows)
    lins = quant.target_linears(model)
    orig = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    weights = list(orig.values())
    npr = {n: entropy_power_ratio(w) for n, w in orig.items()}
    nsum = sum(w.numel() for w in weights)
    mean_npr = sum(npr[n] * w.numel() for n, w in orig.items()) / nsum
    print(f"{len(lins)} target linears, {nsum / 1e6:.1f}M weights; entropy power / variance "
          f"(1 = Gaussian): weighted mean {mean_npr:.3f}, min {min(npr.values()):.3f}, "
          f"max {max(npr.values()):.3f}", flush=True)

    def ppl() -> float:
        return acip.eval.perplexity(model, tok, ids, progress=False)

    fp32 = ppl()
    rows = [{"method": "fp32", "bits": 32.0, "ppl": fp32, "rel_rms": 0.0}]
    print(f"  fp32  ppl {fp32:.2f}", flush=True)
    for rate in rates:
        t = time.perf_counter()
        c = solve_c(weights, rate)
        err = apply_ecsq(lins, orig, c)
        got = ecsq_bits(weights, c)
        p = ppl()
        rows.append({"method": f"ideal ECSQ (entropy only) R={rate:g}", "bits": got, "ppl": p,
                     "rel_rms": err, "step_over_sigma": c})
        print(f"  ideal ECSQ R={rate:g}: {got:.3f} bits, step {c:.3f} sigma, rel RMS {err:.4f}, "
              f"ppl {p:.2f} (x{p / fp32:.3f}) [{time.perf_counter() - t:.0f}s]", flush=True)
        err = apply_slb(lins, orig, npr, rate)
        p = ppl()
        rows.append({"method": f"SLB test channel R={rate:g}", "bits": rate, "ppl": p, "rel_rms": err})
        print(f"  SLB test channel R={rate:g}: rel RMS {err:.4f}, ppl {p:.2f} (x{p / fp32:.3f})", flush=True)
    for r in rows:
        r["x_fp32"] = r["ppl"] / fp32
    print("\n| method | bits/weight | rel. RMS error | KJV ppl | x fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']:.3f} | {r['rel_rms']:.4f} | {r['ppl']:.2f} | {r['x_fp32']:.3f} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": rows, "mean_entropy_power_ratio": mean_npr}, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
