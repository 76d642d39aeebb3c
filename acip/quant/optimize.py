"""Per-row power-of-two scales for 8-bit codes, optimised with LBFGS (EntQuant style).

For a weight ``W`` (out x in) and integer exponents ``t`` (one per row):

    q(t)  = cast(clamp(W / 2**t, -q_max, q_max))        codes in the 8-bit format
    L(t)  = ||W - 2**t q||_1 / ||W||_1  +  lam * mean|q| / u_fmt

LBFGS runs over real-valued ``t`` (scale ``2**t``, a continuous relaxation of the exponent);
the clamp and the cast (rounding to the format's grid) are straight-through, i.e. identity in
the backward pass. With ``What = 2**t q`` that gives ``dWhat_ij/dt_i = ln2 (What_ij - W_ij)``:

    dL/dt_i = ln2 * ( sum_j |W_ij - What_ij| / ||W||_1  -  lam * sum_j |x_ij| / (numel * u_fmt) )

with ``x = W / 2**t`` (the rate's gradient goes through ``|x|``, so codes rounded to 0 still feel
it): the row's residual pushes ``t_i`` down, the rate term pushes it up (smaller codes, fewer
bits). Rounding ``t`` inside the objective would make the gradient piecewise constant and the
LBFGS curvature pairs zero, so instead every ``check_every`` iterations the true loss is
evaluated at ``round(t)`` (power-of-two scales, stored as int8 exponents) and the best rounded
iterate is kept; early stopping ends the run when that best loss stops improving.
A non-finite loss restarts with half the learning
rate; a layer that still fails, has a dynamic range beyond the format's, or ends with a relative
error above ``max_rel_error`` falls back to 8-bit absmax (per-row fp32 scale ``absmax / 127``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import EntropyQuantConfig
from .formats import Format, code_values, entropy_bits, get_format

__all__ = ["QuantResult", "quantize_weight", "absmax8", "dequantize", "OutlierError"]

T_MIN, T_MAX = -120, 120  # exponents are stored as int8


class OutlierError(ValueError):
    """A weight the entropy quantizer cannot handle (and ``fallback='raise'``)."""


@dataclass
class QuantResult:
    """Codes and scales of one weight, plus what the report shows."""

    codes: torch.Tensor  # uint8 (out, in)
    scales: torch.Tensor  # int8 exponents t (entquant) or fp32 scales as int32 bits (absmax8), (out,)
    method: str  # "entquant" | "absmax8"
    fmt: str  # code format of ``codes``
    rel_error: float
    entropy: float  # bits per code
    unique: int
    iterations: int = 0
    retries: int = 0
    reason: str | None = None  # why this layer fell back

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.method, self.fmt)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, method: str, fmt: str) -> torch.Tensor:
    """``What = value[codes] * scale_row`` in fp32 (``scale = 2**t`` or the absmax scale)."""
    values = code_values(fmt, codes.device)[codes.to(torch.int64)]
    if method == "entquant":
        s = torch.exp2(scales.float())
    else:  # fp32 bits kept in an int32 tensor, so loading with dtype=bf16 cannot round them
        s = scales.view(torch.float32) if scales.dtype == torch.int32 else scales.float()
    return values * s[:, None]


def _finish(W: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, method: str, fmt: str, **kw) -> QuantResult:
    What = dequantize(codes, scales, method, fmt)
    norm = float(W.abs().sum())
    err = float((W - What).abs().sum()) / norm if norm > 0 else 0.0
    return QuantResult(codes, scales, method, fmt, err, entropy_bits(codes), int(codes.unique().numel()), **kw)


def absmax8(W: torch.Tensor, reason: str | None = None) -> QuantResult:
    """Plain 8-bit absmax: ``q = round(W / s)``, ``s = max_j |W_ij| / 127`` per row (fp32)."""
    W = W.detach().float()
    s = W.abs().amax(dim=1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(W / s[:, None]).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return _finish(W, codes, s.contiguous().view(torch.int32), "absmax8", "int8", reason=reason)


def _ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward ``y``, backward identity with respect to ``x``."""
    return x + (y - x).detach()


def _loss(W: torch.Tensor, t: torch.Tensor, fmt: Format, lam: float, norm: torch.Tensor) -> torch.Tensor:
    s = torch.exp2(t.clamp(T_MIN, T_MAX))[:, None]
    x = W / s
    xc = _ste(x, x.clamp(-fmt.q_max, fmt.q_max))
    q = _ste(xc, fmt.cast(xc))
    rate = _ste(xc.abs(), q.abs())  # d|q|/dt via |x|: codes rounded to 0 still feel the rate
    return (W - q * s).abs().sum() / norm + lam * rate.mean() / fmt.unit


def _range_outliers(W: torch.Tensor, fmt: Format) -> int:
    """Rows whose ``max|w| / median|w|`` (non-zero entries) exceeds the format's dynamic range."""
    a = W.abs()
    med = torch.where(a > 0, a, torch.full_like(a, float("nan"))).nanmedian(dim=1).values
    ratio = a.amax(dim=1) / med
    bad = torch.isfinite(ratio) & (torch.log2(ratio) > fmt.dynamic_range_log2 - 1.0)
    return int(bad.sum())


def _lbfgs(W: torch.Tensor, t0: torch.Tensor, fmt: Format, cfg: EntropyQuantConfig, lr: float) -> tuple[torch.Tensor | None, float, int]:
    """One LBFGS run from ``t0``; returns (best rounded exponents or None on NaN, loss, iterations)."""
    norm = W.abs().sum()
    t = t0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([t], lr=lr, max_iter=cfg.check_every, history_size=10,
                            tolerance_grad=0.0, tolerance_change=0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(W, t, fmt, cfg.lam, norm)
        loss.backward()
        return loss

    with torch.no_grad():
        best_t = torch.round(t0).clamp(T_MIN, T_MAX)
        best = float(_loss(W, best_t, fmt, cfg.lam, norm))
    history = [best]
    iters = 0
    while iters < cfg.max_iter:
        opt.step(closure)
        iters += cfg.check_every
        with torch.no_grad():
            if not bool(torch.isfinite(t).all()):
                return None, math.nan, iters
            cand = torch.round(t).clamp(T_MIN, T_MAX)
            val = float(_loss(W, cand, fmt, cfg.lam, norm))
        if not math.isfinite(val):
            return None, math.nan, iters
        if val < best:
            best, best_t = val, cand
        history.append(best)
        if cfg.tol > 0 and len(history) > cfg.patience:
            old = history[-1 - cfg.patience]
            if old - best <= cfg.tol * abs(old):
                break
    return best_t, best, iters


@contextmanager
def _one_thread() -> Iterator[None]:
    """The per-iteration work is a few elementwise passes: intra-op threads only add sync cost
    (7-10x slower with 2 threads on a busy 2-core machine), so optimise single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def quantize_weight(W: torch.Tensor, cfg: EntropyQuantConfig, name: str = "weight") -> QuantResult | None:
    """Quantize one weight matrix; ``None`` means "keep dense" (``fallback='keep'``).

    Raises ``ValueError`` for non-finite weights and :class:`OutlierError` when the layer cannot
    be entropy-quantized and ``cfg.fallback == 'raise'``.
    """
    W = W.detach().float().contiguous()
    if W.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight (out x in), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"{name}: the weight {tuple(W.shape)} is empty (a factor of a rank-0 layer) and holds "
                         f"nothing to quantize; quantize_ skips such layers, call quantize_weight only on the others")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: the weight holds NaN or inf values; fix the model before quantizing it")
    fmt = get_format(cfg.fmt)

    def fall(reason: str) -> QuantResult | None:
        if cfg.fallback == "raise":
            raise OutlierError(f"{name}: {reason}; set fallback='absmax8' (or 'keep') to quantize the rest anyway")
        return None if cfg.fallback == "keep" else absmax8(W, reason=reason)

    n_out = _range_outliers(W, fmt)
    if n_out:
        return fall(f"{n_out} row(s) span more than the {fmt.name} dynamic range (extreme outliers)")
    absmax = W.abs().amax(dim=1).clamp_min(2.0 ** -100)
    t0 = torch.ceil(torch.log2(absmax / fmt.q_max)).clamp(T_MIN, T_MAX)
    lr, retries, total = cfg.lr, 0, 0
    while True:
        with _one_thread():
            t, _, iters = _lbfgs(W, t0, fmt, cfg, lr)
        total += iters
        if t is not None:
            break
        if retries >= cfg.max_retries:
            return fall(f"LBFGS gave NaN {retries + 1} times (last lr={lr:g})")
        retries += 1
        lr /= 2
    s = torch.exp2(t)[:, None]
    codes = fmt.to_codes(W / s)
    res = _finish(W, codes, t.to(torch.int8), "entquant", fmt.name, iterations=total, retries=retries)
    if res.rel_error > cfg.max_rel_error:
        return fall(f"relative error {res.rel_error:.3f} > max_rel_error={cfg.max_rel_error:g}")
    return res
