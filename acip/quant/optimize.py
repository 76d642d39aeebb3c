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
from typing import Any, Iterator

import torch

from .config import EntropyQuantConfig
from .formats import Format, code_values, entropy_bits, get_format

__all__ = ["QuantResult", "quantize_weight", "absmax8", "dequantize", "OutlierError", "BudgetError", "lower_hull",
           "allocate_hulls", "calibration_batches", "calibration_loss", "measure_rates", "coded_size",
           "plan_layer_lams", "LAM_LADDER"]

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


# ---------------------------------------------------------------------------------------------------
# Per-layer rate allocation: shared by EntropyQuantConfig(allocation="sensitivity") and the byte-budget
# export (acip/export/budget.py). Each layer offers points (bytes, predicted damage); the solver keeps
# each layer's lower convex hull and picks one point per layer under a byte budget.


class BudgetError(ValueError):
    """A byte budget that no setting reaches (below the smallest one)."""


def lower_hull(nbytes: "np.ndarray", damage: "np.ndarray") -> "np.ndarray":
    """Indices of the lower convex hull of the points ``(bytes, damage)``, by increasing bytes.

    The first index is the cheapest point (least damage among equally cheap ones); along the hull
    damage strictly falls and the damage saved per byte (the slope) falls too.
    """
    import numpy as np

    order = np.lexsort((damage, nbytes))
    b, d = nbytes[order], damage[order]
    best = np.minimum.accumulate(d)
    keep = np.ones(len(d), dtype=bool)
    keep[1:] = d[1:] < best[:-1]  # Pareto: strictly less damage than every cheaper point
    cand = order[keep]
    hull: list[int] = []
    for i in cand.tolist():
        while len(hull) >= 2:
            a, c = hull[-2], hull[-1]
            # drop c when it lies on or above the chord a -> i
            cross = (nbytes[c] - nbytes[a]) * (damage[i] - damage[a]) - (damage[c] - damage[a]) * (nbytes[i] - nbytes[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return np.asarray(hull, dtype=np.int64)


def allocate_hulls(points: "list[tuple[np.ndarray, np.ndarray]]", budget: float,
                   hulls: "list[np.ndarray] | None" = None) -> list[int]:
    """One point per layer minimising the summed damage with summed bytes <= ``budget``.

    ``points[l] = (bytes, damage)`` arrays of layer ``l``. Lagrangian relaxation over each layer's
    lower convex hull: for a multiplier ``mu`` every layer takes the hull point minimising
    ``damage + mu * bytes``, i.e. every hull step whose damage saved per byte exceeds ``mu``. Sorting
    all hull steps by that slope once gives every ``mu`` at once, so the bisection on ``mu`` is exact:
    the longest prefix of the sorted steps that fits the budget. The budget left over is then filled
    greedily (steepest remaining steps that still fit, each layer's steps in order), and what is
    still left by the single off-hull move per round that saves the most damage. Returns, per
    layer, the index into its points. Raises :class:`BudgetError` when even the cheapest points
    together exceed ``budget``.
    """
    import numpy as np

    hulls = hulls if hulls is not None else [lower_hull(b, d) for b, d in points]
    base = float(sum(b[h[0]] for (b, _), h in zip(points, hulls)))
    if budget < base:
        raise BudgetError(f"budget {budget:.0f} bytes is below the smallest setting, {base:.0f} bytes")
    gains, sizes, lay, pos = [], [], [], []
    for l, ((b, d), h) in enumerate(zip(points, hulls)):
        if len(h) < 2:
            continue
        db, dd = np.diff(b[h]), -np.diff(d[h])
        gains.append(dd / np.maximum(db, 1e-12))
        sizes.append(db)
        lay.append(np.full(len(db), l, dtype=np.int64))
        pos.append(np.arange(1, len(h), dtype=np.int64))
    cur = np.zeros(len(points), dtype=np.int64)
    if gains:
        g, s, ly, ps = (np.concatenate(x) for x in (gains, sizes, lay, pos))
        order = np.lexsort((ps, ly, -g))  # steepest first; a layer's steps stay in hull order
        cum = base + np.cumsum(s[order])
        n = int(np.searchsorted(cum, budget + 1e-9, side="right"))
        for l, p in zip(ly[order[:n]].tolist(), ps[order[:n]].tolist()):
            cur[l] = max(cur[l], p)
        left = budget - (cum[n - 1] if n else base)
        blocked = np.zeros(len(points), dtype=bool)
        for i in order[n:].tolist():  # greedy fill of what the prefix leaves
            l = int(ly[i])
            if blocked[l] or ps[i] != cur[l] + 1:
                continue
            if s[i] <= left + 1e-9:
                cur[l] += 1
                left -= s[i]
            else:
                blocked[l] = True
    else:
        left = budget - base
    pick = [int(h[c]) for h, c in zip(hulls, cur.tolist())]
    for _ in range(len(points)):  # last, any point (hull or not) that fits what is left and saves the most
        best = (0.0, -1, -1)
        for l, (b, d) in enumerate(points):
            ok = (b <= b[pick[l]] + left + 1e-9) & (d < d[pick[l]])
            if ok.any():
                i = int(np.flatnonzero(ok)[np.argmin(d[ok])])
                if d[pick[l]] - d[i] > best[0]:
                    best = (float(d[pick[l]] - d[i]), l, i)
        if best[1] < 0:
            break
        _, l, i = best
        left -= float(points[l][0][i] - points[l][0][pick[l]])
        pick[l] = i
    return pick


def calibration_batches(calib: Any) -> "list[dict[str, torch.Tensor]]":
    """Calibration data as a list of model keyword dicts with ``labels``.

    ``calib``: a 2-D LongTensor of token ids (one batch), or a list of such tensors or of dicts
    with ``input_ids`` (and optionally ``attention_mask`` / ``labels``)."""
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    if isinstance(calib, dict):
        calib = [calib]
    out = []
    for i, b in enumerate(list(calib or [])):
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b}
        if not isinstance(b, dict) or not isinstance(b.get("input_ids"), torch.Tensor):
            raise TypeError(f"calibration batch {i}: expected a LongTensor of token ids (batch x seq) or a dict with "
                            f"'input_ids', got {type(b).__name__}; e.g. acip.eval.token_windows(tok, texts, 128, 8)")
        ids = b["input_ids"]
        ids = ids[None] if ids.dim() == 1 else ids
        out.append({**b, "input_ids": ids, "labels": b.get("labels", ids)})
    if not out:
        raise ValueError("calibration needs at least one batch of token ids (calib=...)")
    return out


@torch.no_grad()
def calibration_loss(model: "torch.nn.Module", batches: "list[dict[str, torch.Tensor]]") -> float:
    """Mean language-model loss of ``model`` over ``batches`` (from :func:`calibration_batches`)."""
    dev = next(model.parameters()).device
    total = 0.0
    for b in batches:
        total += float(model(**{k: v.to(dev) for k, v in b.items()}).loss)
    return total / len(batches)


def coded_size(codes: torch.Tensor) -> tuple[float, float]:
    """What ``encode_codes`` would store for ``codes``, without coding them: ``(bits per code, fixed bytes)``.

    The rANS payload is the cross-entropy of the codes under the quantized frequency table plus
    about 3 bytes per stream of ``SYMBOLS_PER_STREAM`` codes (measured: 2.3-3.5); fixed = the packed
    table (32-byte bitmap + 2 bytes per used symbol) + sha256 + one stream's flush."""
    import numpy as np

    from . import rans

    sym = codes.detach().cpu().reshape(-1).numpy()
    hist = np.bincount(sym, minlength=256)
    used = hist > 0
    if int(used.sum()) <= 1:
        return 0.0, float(32 + 2 * int(used.sum()) + 32)
    f = np.asarray(rans.quantize_freqs(hist), dtype=np.float64)
    ce = float((hist[used] * (rans.PROB_BITS - np.log2(f[used]))).sum()) / sym.size
    return ce + 8.0 * 4 / rans.SYMBOLS_PER_STREAM, float(32 + 2 * int(used.sum()) + 32 + 4)


@torch.no_grad()
def measure_rates(W: torch.Tensor, lams: "tuple[float, ...] | list[float]", rows: int = 256, seed: int = 0,
                  name: str = "weight", base: EntropyQuantConfig | None = None) -> dict[str, list[float]]:
    """The entropy quantizer's rate and error on ``W`` at each ``lam``, measured on at most ``rows`` rows.

    Rows are independent in the objective (per-row scales), so a random subset of rows gives the
    bits per code and the relative error of the whole matrix up to sampling noise. Returns lists
    (one entry per lam): ``eps`` = ``||W - What||_F^2 / ||W||_F^2``, ``bits`` = coded stream bits per
    weight, ``fixed`` = frequency table + sha256 bytes (once per matrix), ``row_bytes`` = scale
    bytes per row (1 for int8 exponents, 4 for an absmax8 fallback).
    """
    W = W.detach().float()
    if W.shape[0] > rows:
        idx = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(seed))[:rows].sort().values
        W = W.index_select(0, idx)
    norm = float(W.pow(2).sum()) or 1.0
    out: dict[str, list[float]] = {"eps": [], "bits": [], "fixed": [], "row_bytes": []}
    for lam in lams:
        cfg = EntropyQuantConfig(**{**(base.to_dict() if base is not None else {}), "lam": float(lam),
                                    "allocation": "uniform"})
        res = quantize_weight(W, cfg, name)
        if res is None:  # fallback="keep": stays a float weight
            out["eps"].append(0.0)
            out["bits"].append(8.0 * W.element_size())
            out["fixed"].append(0.0)
            out["row_bytes"].append(0.0)
            continue
        bits, fixed = coded_size(res.codes)
        out["eps"].append(float((W - res.dequantize()).pow(2).sum()) / norm)
        out["bits"].append(bits)
        out["fixed"].append(fixed)
        out["row_bytes"].append(float(res.scales.element_size()))
    return out


LAM_LADDER = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of cfg.lam a layer may take


def plan_layer_lams(model: "torch.nn.Module", targets: "dict[str, torch.nn.Linear]", cfg: EntropyQuantConfig,
                    calib: Any, rows: int = 128, ladder: "tuple[float, ...]" = LAM_LADDER) -> dict[str, float]:
    """Per-layer lam for ``allocation="sensitivity"``, at the bytes uniform ``cfg.lam`` would take.

    Cost model per layer ``l`` and candidate ``lam = cfg.lam * m`` (``m`` in ``ladder``)::

        D_l(lam) = s_l * eps_l(lam),   s_l = 1/2 * sum_ij F_ij W_ij^2,   F = mean over batches of (dL/dW)^2

    a second-order (empirical Fisher) prediction of the loss increase when every weight of the
    layer gets a relative squared error ``eps_l(lam)`` (measured with :func:`measure_rates`, as are
    the bytes). The allocation (:func:`allocate_hulls`) minimises ``sum_l D_l`` with the summed
    bytes at most those of ``cfg.lam`` everywhere, so layers whose error costs more loss get a
    smaller lam (more bits) and robust layers pay for it.
    """
    batches = calibration_batches(calib)
    names = [n for n, lin in targets.items() if lin.weight.numel()]
    weights = [targets[n].weight for n in names]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    was = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        dev = weights[0].device
        with torch.enable_grad():
            for b in batches:
                loss = model(**{k: v.to(dev) for k, v in b.items()}).loss
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f += g.detach().float().pow(2) / len(batches)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        model.train(was)
    import numpy as np

    lams = [cfg.lam * m for m in ladder] if cfg.lam > 0 else [0.0]
    base = lams.index(cfg.lam) if cfg.lam in lams else 0
    points, budget = [], 0.0
    for name, w, f in zip(names, weights, fisher):
        sens = 0.5 * float((f * w.detach().float().pow(2)).sum())
        got = measure_rates(w, lams, rows=rows, name=name, base=cfg)
        out_f, n = w.shape[0], w.numel()
        nbytes = np.array([b * n / 8 + fx + rb * out_f for b, fx, rb in zip(got["bits"], got["fixed"], got["row_bytes"])])
        points.append((nbytes, sens * np.asarray(got["eps"])))
        budget += float(nbytes[base])
    pick = allocate_hulls(points, budget)
    return {name: float(lams[i]) for name, i in zip(names, pick)}
