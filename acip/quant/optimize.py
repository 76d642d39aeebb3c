"""Per-row power-of-two scales for 8-bit codes (EntQuant style): an exact search, or LBFGS.

For a weight ``W`` (out x in) and integer exponents ``t`` (one per row):

    q(t)  = cast(clamp(W / 2**t, -q_max, q_max))        codes in the 8-bit format
    L(t)  = ||W - 2**t q||_1 / ||W||_1  +  lam * mean|q| / u_fmt

``L`` is a sum over rows, each term depending on its own ``t_i`` only, so the exact minimiser
over integer exponents is found row by row. ``solver="search"`` (the default) does exactly that:
with ``t0_i = ceil(log2(max_j |W_ij| / q_max))`` (the smallest exponent that clamps nothing) it
evaluates every row's term at ``t0_i + d`` for ``d = -3 .. ceil(dynamic range of the format) + 3``
(past that every code of the row is 0 and the term no longer changes), all rows at once, and
keeps each row's best ``d``. The error and rate of every candidate do not depend on ``lam``, so
one sweep also gives the result at any number of ``lam`` values (:func:`measure_rates`, the rate
estimate of the byte-budget cost model and of ``allocation="sensitivity"``).

``solver="lbfgs"`` (the optimiser of the EntQuant paper, the default before 2026-12-01) runs
LBFGS over real-valued ``t`` (scale ``2**t``, a continuous relaxation of the exponent); the clamp
and the cast (rounding to the format's grid) are straight-through, i.e. identity in the backward
pass. With ``What = 2**t q`` that gives ``dWhat_ij/dt_i = ln2 (What_ij - W_ij)``:

    dL/dt_i = ln2 * ( sum_j |W_ij - What_ij| / ||W||_1  -  lam * sum_j |x_ij| / (numel * u_fmt) )

with ``x = W / 2**t`` (the rate's gradient goes through ``|x|``, so codes rounded to 0 still feel
it): the row's residual pushes ``t_i`` down, the rate term pushes it up (smaller codes, fewer
bits). Rounding ``t`` inside the objective would make the gradient piecewise constant and the
LBFGS curvature pairs zero, so instead every ``check_every`` iterations the true loss is
evaluated at ``round(t)`` (power-of-two scales, stored as int8 exponents) and the best rounded
iterate is kept; early stopping ends the run when that best loss stops improving. It lands
within 0.1-2% of the search's (exact) loss (tests/test_quant_optimize.py) and takes about 3x
longer per ``lam``. A non-finite loss restarts with half the learning rate.

Either way, a layer that has a dynamic range beyond the format's, or (LBFGS) still gives NaN,
or ends with a relative error above ``max_rel_error`` falls back to 8-bit absmax (per-row fp32
scale ``absmax / 127``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .config import EntropyQuantConfig
from .formats import Format, code_values, entropy_bits, get_format

__all__ = ["QuantResult", "quantize_weight", "absmax8", "dequantize", "OutlierError", "measure_rates", "coded_size",
           "coded_size_of_hist", "search_exponents", "quantize_uniform", "gptq_codes", "uniform_steps", "UNIFORM_STEP_DEN",
           "UNIFORM_RATE_UNIT"]

T_MIN, T_MAX = -120, 120  # exponents are stored as int8


class OutlierError(ValueError):
    """A weight the entropy quantizer cannot handle (and ``fallback='raise'``)."""


@dataclass
class QuantResult:
    """Codes and scales of one weight, plus what the report shows."""

    codes: torch.Tensor  # uint8 (out, in)
    scales: torch.Tensor  # int8 exponents t (entquant, ecsq) or fp32 scales as int32 bits (absmax8), (out,)
    method: str  # "entquant" | "ecsq" | "absmax8"
    fmt: str  # code format of ``codes``
    rel_error: float
    entropy: float  # bits per code
    unique: int
    iterations: int = 0
    retries: int = 0
    reason: str | None = None  # why this layer fell back
    step_offset: int = 0  # ecsq: the tensor's exponent offset (steps 2**((t + offset) / UNIFORM_STEP_DEN))

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.method, self.fmt, self.step_offset)


METHODS = ("entquant", "ecsq", "absmax8")
"""The stored methods ``dequantize`` knows (``acip_layout`` entries with another one are refused)."""


def dequantize(codes: torch.Tensor, scales: torch.Tensor, method: str, fmt: str, step_offset: int = 0) -> torch.Tensor:
    """``What = value[codes] * scale_row`` in fp32.

    ``scale = 2**t`` (entquant), ``2**((t + step_offset) / UNIFORM_STEP_DEN)`` (ecsq) or the
    absmax scale stored as fp32 bits (absmax8)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; this acip knows {list(METHODS)} "
                         f"(a file written by a newer acip? upgrade acip to load it)")
    values = code_values(fmt, codes.device)[codes.to(torch.int64)]
    if method == "entquant":
        s = torch.exp2(scales.float())
    elif method == "ecsq":
        s = torch.exp2((scales.float() + float(step_offset)) / UNIFORM_STEP_DEN)
    else:  # fp32 bits kept in an int32 tensor, so loading with dtype=bf16 cannot round them
        s = scales.view(torch.float32) if scales.dtype == torch.int32 else scales.float()
    return values * s[:, None]


def _finish(W: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, method: str, fmt: str, **kw) -> QuantResult:
    What = dequantize(codes, scales, method, fmt, kw.get("step_offset", 0))
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


CHUNK = 1 << 17  # elements per block of rows in the search (keeps a block's passes in cache)


def _candidates(fmt: Format) -> range:
    """Offsets ``d`` of the exponent above ``t0`` that the search evaluates (see the module docstring)."""
    return range(-3, math.ceil(fmt.dynamic_range_log2) + 4)


def _sweep(W: torch.Tensor, fmt: Format, t0: torch.Tensor, hist: bool = False) -> dict[str, torch.Tensor]:
    """Per row and candidate exponent ``t0 + d``: L1 error, squared error and ``sum |q|`` (rows x C),
    and with ``hist`` the code histogram of every (row, candidate) (rows x C x 256, int64)."""
    ds = list(_candidates(fmt))
    n, m = W.shape
    out = {k: torch.empty(n, len(ds)) for k in ("l1", "l2", "rate")}
    if hist:
        out["hist"] = torch.zeros(n, len(ds), 256, dtype=torch.int64)
    step = max(1, CHUNK // max(m, 1))
    for a in range(0, n, step):
        w = W[a: a + step]
        for c, d in enumerate(ds):
            s = torch.exp2((t0[a: a + step] + d).clamp(T_MIN, T_MAX))[:, None]
            x = (w / s).clamp_(-fmt.q_max, fmt.q_max)
            if fmt.name == "e4m3":
                x8 = x.to(torch.float8_e4m3fn)
                q = x8.float()
            else:
                q = torch.round(x)
            if hist:
                codes = x8.view(torch.uint8) if fmt.name == "e4m3" else q.to(torch.int8).view(torch.uint8)
                rows = torch.arange(w.shape[0])[:, None] * 256
                out["hist"][a: a + step, c] = torch.bincount((rows + codes.long()).reshape(-1),
                                                             minlength=w.shape[0] * 256).view(-1, 256)
            e = (w - q * s).abs_()
            out["l1"][a: a + step, c] = e.sum(1)
            out["l2"][a: a + step, c] = e.pow_(2).sum(1)
            out["rate"][a: a + step, c] = q.abs_().sum(1)
    return out


def _t0(W: torch.Tensor, fmt: Format) -> torch.Tensor:
    absmax = W.abs().amax(dim=1).clamp_min(2.0 ** -100)
    return torch.ceil(torch.log2(absmax / fmt.q_max)).clamp(T_MIN, T_MAX)


def search_exponents(W: torch.Tensor, fmt: str | Format, lams: "list[float] | tuple[float, ...]",
                     norm: float | None = None, numel: int | None = None) -> list[torch.Tensor]:
    """The exact minimiser of ``L`` over integer exponents, one per row, for each ``lam`` (one sweep).

    ``norm`` / ``numel`` default to ``||W||_1`` / ``W.numel()``; pass the whole matrix's when ``W``
    holds some of its rows (the row terms of ``L`` are normalised by the whole matrix's).
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    W = W.detach().float()
    t0 = _t0(W, fmt)
    with _one_thread():
        sw = _sweep(W, fmt, t0)
    return _pick(sw, t0, fmt, lams, float(W.abs().sum()) if norm is None else norm,
                 W.numel() if numel is None else numel)[0]


def _pick(sw: dict[str, torch.Tensor], t0: torch.Tensor, fmt: Format, lams, norm: float,
          numel: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per lam: (the best exponents, the index of the chosen candidate) of every row."""
    d0 = _candidates(fmt).start
    ts, picks = [], []
    for lam in lams:
        c = torch.argmin(sw["l1"] / max(norm, 1e-300) + float(lam) * sw["rate"] / (numel * fmt.unit), dim=1)
        picks.append(c)
        ts.append((t0 + d0 + c).clamp(T_MIN, T_MAX))
    return ts, picks


UNIFORM_STEP_DEN: int = 16
"""``fmt="uniform"`` stores each row's step as an int8 exponent in 1/16 octave:
``step_i = 2**((t_i + offset) / 16)``, with one integer ``offset`` per tensor."""
UNIFORM_RATE_UNIT: float = 540.0
"""Divisor of the rate term of ``fmt="uniform"``: ``J(c) = ||W - What||_F^2 / ||W||_F^2 + lam * H(c) / 540``.
At high rate (error ``c^2 / 12`` of each row's mean square, entropy ``h - log2 c``) the minimiser
is ``c = sqrt(6 lam / (540 ln 2)) ~ 0.25 sqrt(lam / 3.9)``. Measured on MiniLM: lam = 3.3 / 13.5 / 32.5
store 4.2 / 3.2 / 2.6 bits per weight (e4m3 needs lam = 3.4 / 16 / 48.5 for those rates)."""
UNIFORM_Q_MAX: int = 127


def uniform_steps(W: torch.Tensor, c: float) -> tuple[torch.Tensor, int]:
    """Per-row step exponents of ``fmt="uniform"`` at step-to-RMS ratio ``c``: ``(t int8 (out,), offset)``.

    ``e_i = max(round(16 log2(c * rms_i)), ceil(16 log2(max_j |W_ij| / 127)))`` (the second term
    keeps every code inside +-127, so nothing is clamped; ``c = 0`` gives 8-bit absmax steps),
    ``offset = max_i e_i - 127`` and ``t_i = clamp(e_i - offset, -128, 127)``: a row more than 16
    octaves below the tensor's largest step gets a coarser step than asked (never a finer one).
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"uniform_steps expects a 2-D float weight (out x in), got "
                         f"{getattr(W, 'shape', type(W).__name__)}")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"uniform_steps: c (step / row RMS) must be a finite number >= 0, got {c!r}")
    tiny = 2.0 ** -126
    need = torch.ceil(UNIFORM_STEP_DEN * torch.log2((W.abs().amax(dim=1) / UNIFORM_Q_MAX).clamp_min(tiny)))
    if c > 0:
        rms = W.pow(2).mean(dim=1).sqrt()
        want = torch.round(UNIFORM_STEP_DEN * torch.log2((c * rms).clamp_min(tiny)))
        need = torch.maximum(need, want)
    offset = int(need.max()) - 127
    return (need - offset).clamp(-128, 127).to(torch.int8), offset


def _uniform_eval(W: torch.Tensor, c: float, norm2: float, keep: bool = False) -> tuple[float, float, Any]:
    """``(||W - What||^2 / norm2, H(codes) in bits, (t, offset, q) if keep)`` at ratio ``c``."""
    t, off = uniform_steps(W, c)
    s = torch.exp2((t.float() + float(off)) / UNIFORM_STEP_DEN)[:, None]
    q = torch.round(W / s).clamp_(-UNIFORM_Q_MAX, UNIFORM_Q_MAX)
    d = float((W - q * s).pow_(2).sum()) / norm2
    h = torch.bincount((q + UNIFORM_Q_MAX).reshape(-1).to(torch.int64), minlength=2 * UNIFORM_Q_MAX + 1).double()
    p = h[h > 0] / q.numel()
    return d, float(-(p * p.log2()).sum()), ((t, off, q) if keep else None)


def gptq_codes(W: torch.Tensor, steps: torch.Tensor, gram: torch.Tensor, damp: float = 0.01, block: int = 128,
               name: str = "weight") -> torch.Tensor:
    """Codes ``q`` (float, in ``[-127, 127]``) of ``W`` on the per-row steps ``steps`` with GPTQ's error feedback.

    ``H = gram + damp * mean(diag(gram)) * I`` (``gram = X^T X`` of the layer's inputs, in x in) and
    ``U`` the upper Cholesky factor of ``H^{-1}``. Column by column (in blocks of ``block``, the
    update of the later blocks done once per block, as in the GPTQ paper): ``q_j = round(w_j /
    Delta)``, ``e = (w_j - q_j Delta) / U_jj``, ``W[:, j+1:] -= e U[j, j+1:]``. Each step is the
    optimal correction of the not-yet-rounded columns for the output error ``||(W - What) X^T||^2``
    (the OBS update). Codes are clamped to +-127 (a corrected weight may leave the range its step
    was set for).
    """
    n_in = W.shape[1]
    if gram.shape != (n_in, n_in):
        raise ValueError(f"{name}: the calibration Gram is {tuple(gram.shape)} but the weight has {n_in} input "
                         f"columns; pass the X^T X of this layer's inputs")
    H = gram.detach().to(W.device, torch.float64).clone()
    H.diagonal().add_(damp * float(H.diagonal().mean().clamp_min(1e-12)))
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(W.dtype)
    except RuntimeError as e:  # linalg errors on a non-positive-definite matrix
        raise ValueError(f"{name}: the dampened calibration Gram is not positive definite ({e}); raise damp "
                         f"(now {damp:g}) or calibrate on more tokens") from None
    W = W.clone()
    s = steps.reshape(-1).to(W.dtype)
    Q = torch.empty_like(W)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        for j in range(i2 - i1):
            q = torch.round(W1[:, j] / s).clamp_(-UNIFORM_Q_MAX, UNIFORM_Q_MAX)
            Q[:, i1 + j] = q
            e = (W1[:, j] - q * s) / U1[j, j]
            W1[:, j + 1:] -= e[:, None] * U1[j, j + 1:][None, :]
            E1[:, j] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q


def quantize_uniform(W: torch.Tensor, lam: float, name: str = "weight", gram: torch.Tensor | None = None,
                     damp: float = 0.01) -> QuantResult:
    """Entropy-coded uniform scalar quantization (ECSQ) of one weight: ``fmt="uniform"``.

    Every row ``i`` gets the step ``Delta_i ~ c * rms_i`` (:func:`uniform_steps`: rounded to 1/16
    octave, at least ``max|W_i| / 127``), codes ``q = round(W / Delta)`` in int8 and
    ``What = q * Delta``, the design of the ideal ECSQ of scripts/bench_quant_bound.py. The one
    ratio ``c`` of the tensor minimises

        J(c) = ||W - What||_F^2 / ||W||_F^2 + lam * H(q) / UNIFORM_RATE_UNIT,

    ``H`` the empirical entropy of the codes (what the rANS coder pays, bits per weight), over
    ``c = 2**(k/16)``: a scan in half octaves within 2 octaves of the high-rate optimum (extended
    while the best is at an end), then a pattern search down to 1/16 octave (about 15 evaluations
    of ``J``, one pass over ``W`` each). ``lam = 0`` gives 8-bit absmax steps. Stored: codes, int8 ``t`` and
    ``offset`` (``QuantResult.step_offset``), method ``"ecsq"``, code format ``"int8"``.

    ``gram`` (``X^T X`` of the layer's calibration inputs): the steps and ``c`` are chosen as above,
    then the codes by :func:`gptq_codes` instead of rounding to nearest (``rounding="gptq"``).
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"{name}: quantize_uniform expects a non-empty 2-D weight, got "
                         f"{getattr(W, 'shape', type(W).__name__)}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{name}: lam must be a finite number >= 0, got {lam!r}")
    W = W.detach().float().contiguous()
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: the weight holds NaN or inf values; fix the model before quantizing it")
    norm2 = float(W.pow(2).sum()) or 1.0
    evals = 0
    with _one_thread():
        if lam == 0:
            c = 0.0
        else:
            cache: dict[int, float] = {}

            def J(k: int) -> float:
                nonlocal evals
                if k not in cache:
                    d, h, _ = _uniform_eval(W, 2.0 ** (k / UNIFORM_STEP_DEN), norm2)
                    cache[k] = d + float(lam) * h / UNIFORM_RATE_UNIT
                    evals += 1
                return cache[k]

            den = UNIFORM_STEP_DEN
            k0 = round(den * math.log2(math.sqrt(6.0 * lam / (UNIFORM_RATE_UNIT * math.log(2.0)))))
            ks = list(range(k0 - 2 * den, k0 + 2 * den + 1, den // 2))
            best = min(ks, key=J)
            while best in (ks[0], ks[-1]) and abs(best - k0) < 24 * den:  # optimum at an end: extend the scan
                nxt = best + (den // 2) * (1 if best == ks[-1] else -1)
                ks = sorted(set(ks) | {nxt})
                if J(nxt) >= J(best):
                    break
                best = nxt
            step = den // 4
            while step >= 1:
                cand = min((best, best - step, best + step), key=J)  # ties keep best
                if cand == best:
                    step //= 2
                best = cand
            c = 2.0 ** (best / den)
        _, _, (t, off, q) = _uniform_eval(W, c, norm2, keep=True)
        if gram is not None:
            q = gptq_codes(W, torch.exp2((t.float() + float(off)) / UNIFORM_STEP_DEN), gram, damp, name=name)
    codes = q.to(torch.int8).view(torch.uint8)
    return _finish(W, codes, t, "ecsq", "int8", iterations=evals, step_offset=off)


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

    def fall(reason: str) -> QuantResult | None:
        if cfg.fallback == "raise":
            raise OutlierError(f"{name}: {reason}; set fallback='absmax8' (or 'keep') to quantize the rest anyway")
        return None if cfg.fallback == "keep" else absmax8(W, reason=reason)

    if cfg.fmt == "uniform":
        if cfg.rounding == "gptq" and cfg.gram is None:
            raise ValueError(f"{name}: rounding='gptq' needs the layer's calibration Gram; quantize_(model, cfg, "
                             f"calib=batches) sets it")
        res = quantize_uniform(W, cfg.lam, name, gram=cfg.gram if cfg.rounding == "gptq" else None, damp=cfg.damp)
        if res.rel_error > cfg.max_rel_error:
            return fall(f"relative error {res.rel_error:.3f} > max_rel_error={cfg.max_rel_error:g}")
        return res
    fmt = get_format(cfg.fmt)

    n_out = _range_outliers(W, fmt)
    if n_out:
        return fall(f"{n_out} row(s) span more than the {fmt.name} dynamic range (extreme outliers)")
    t0 = _t0(W, fmt)
    retries, total = 0, 0
    if cfg.solver == "search":
        t = search_exponents(W, fmt, [cfg.lam])[0]
        total = len(_candidates(fmt))
    else:
        lr = cfg.lr
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


def coded_size(codes: torch.Tensor) -> tuple[float, float]:
    """What ``encode_codes`` would store for ``codes``, without coding them: ``(bits per code, fixed bytes)``.

    The rANS payload is the cross-entropy of the codes under the quantized frequency table plus
    about 3 bytes per stream of ``SYMBOLS_PER_STREAM`` codes (measured: 2.3-3.5); fixed = the packed
    table (32-byte bitmap + 2 bytes per used symbol) + sha256 + one stream's flush."""
    import numpy as np

    return coded_size_of_hist(np.bincount(codes.detach().cpu().reshape(-1).numpy(), minlength=256))


def coded_size_of_hist(hist: "np.ndarray") -> tuple[float, float]:
    """:func:`coded_size` from the codes' histogram (256 counts)."""
    import numpy as np

    from . import rans

    hist = np.asarray(hist, dtype=np.int64)
    used = hist > 0
    if int(used.sum()) <= 1:
        return 0.0, float(32 + 2 * int(used.sum()) + 32)
    f = np.asarray(rans.quantize_freqs(hist), dtype=np.float64)
    ce = float((hist[used] * (rans.PROB_BITS - np.log2(f[used]))).sum()) / float(hist.sum())
    return ce + 8.0 * 4 / rans.SYMBOLS_PER_STREAM, float(32 + 2 * int(used.sum()) + 32 + 4)


@torch.no_grad()
def measure_rates(W: torch.Tensor, lams: "tuple[float, ...] | list[float]", rows: int = 256, seed: int = 0,
                  name: str = "weight", base: EntropyQuantConfig | None = None) -> dict[str, list[float]]:
    """The entropy quantizer's rate and error on ``W`` at each ``lam``, measured on at most ``rows`` rows.

    Rows are independent in the objective (per-row scales), so a random subset of rows gives the
    bits per code and the relative error of the whole matrix up to sampling noise. One sweep of
    the exact search (:func:`search_exponents`, normalised by the whole matrix, so each sampled row
    gets the exponent the quantizer gives it) serves every ``lam``. Returns lists (one entry per
    lam): ``eps`` = ``||W - What||_F^2 / ||W||_F^2``, ``bits`` = coded stream bits per weight,
    ``fixed`` = frequency table + sha256 bytes (once per matrix), ``row_bytes`` = scale bytes per row
    (1 for int8 exponents, 4 for an absmax8 fallback). The fallbacks of ``base`` (a layer with
    outliers, a relative L1 error above ``max_rel_error``) are taken as :func:`quantize_weight`
    takes them. With ``base.solver == "lbfgs"`` the quantizer lands within about 1% of these rates.
    """
    import numpy as np

    cfg = base if base is not None else EntropyQuantConfig()
    uniform = cfg.fmt == "uniform"
    fmt = None if uniform else get_format(cfg.fmt)
    W = W.detach().float()
    if W.numel() == 0:
        raise ValueError(f"{name}: the weight {tuple(W.shape)} is empty and has no rate to measure")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: the weight holds NaN or inf values; fix the model before quantizing it")
    norm1, numel = float(W.abs().sum()), W.numel()
    outliers = 0 if fmt is None else _range_outliers(W, fmt)
    if W.shape[0] > rows:
        idx = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(seed))[:rows].sort().values
        W = W.index_select(0, idx)
    norm2 = float(W.pow(2).sum()) or 1.0
    sample1 = float(W.abs().sum()) or 1.0
    out: dict[str, list[float]] = {"eps": [], "bits": [], "fixed": [], "row_bytes": []}

    def fallback(reason: str) -> None:
        if cfg.fallback == "raise":
            raise OutlierError(f"{name}: {reason}; set fallback='absmax8' (or 'keep') to quantize the rest anyway")
        if cfg.fallback == "keep":  # stays a float weight
            vals = (0.0, 8.0 * W.element_size(), 0.0, 0.0)
        else:
            res = absmax8(W, reason=reason)
            vals = (float((W - res.dequantize()).pow(2).sum()) / norm2, *coded_size(res.codes), 4.0)
        for k, v in zip(("eps", "bits", "fixed", "row_bytes"), vals):
            out[k].append(v)

    if uniform:  # fmt="uniform": the quantizer itself on the sampled rows (J is relative, so a sample serves)
        for lam in lams:
            res = quantize_uniform(W, float(lam), name)
            if res.rel_error > cfg.max_rel_error:
                fallback(f"relative error {res.rel_error:.3f} > max_rel_error={cfg.max_rel_error:g}")
                continue
            bits, fixed = coded_size(res.codes)
            out["eps"].append(float((W - res.dequantize()).pow(2).sum()) / norm2)
            out["bits"].append(bits)
            out["fixed"].append(fixed)
            out["row_bytes"].append(1.0)
        return out
    if outliers:
        for _ in lams:
            fallback(f"{outliers} row(s) span more than the {fmt.name} dynamic range (extreme outliers)")
        return out
    t0 = _t0(W, fmt)
    with _one_thread():
        sw = _sweep(W, fmt, t0, hist=True)
    _, picks = _pick(sw, t0, fmt, lams, norm1, numel)
    ar = torch.arange(W.shape[0])
    for c in picks:
        l1 = float(sw["l1"][ar, c].sum()) / sample1
        if l1 > cfg.max_rel_error:
            fallback(f"relative error {l1:.3f} > max_rel_error={cfg.max_rel_error:g}")
            continue
        bits, fixed = coded_size_of_hist(sw["hist"][ar, c].sum(0).numpy().astype(np.int64))
        out["eps"].append(float(sw["l2"][ar, c].sum()) / norm2)
        out["bits"].append(bits)
        out["fixed"].append(fixed)
        out["row_bytes"].append(1.0)
    return out
