"""Layer sensitivity from the empirical Fisher, and the per-layer allocation built on it.

The one home of "how much loss does an error in this layer cost": the byte-budget export
(:mod:`acip.export.budget`, rank and storage per layer) and ``EntropyQuantConfig(allocation=
"sensitivity")`` (lam per layer, :func:`plan_layer_lams`) both predict a layer's loss increase with
the formula below and allocate with :func:`allocate_hulls`.

**The measure.** A few forward+backward passes over calibration windows of *training* text (never
held-out text), one window per pass: for every target layer ``y = W x`` (``W``: out x in) the
gradient of the window's mean loss with respect to ``W`` is ``G_w = sum_t delta_t x_t^T``
(``delta_t = dL_w/dy_t``, ``x_t`` the layer's input at token ``t``), taken from hooks on the layer's
input and output (no weight gradient is formed by autograd). The diagonal empirical Fisher is

    F = (1/N) sum_w n_w G_w**2          (elementwise; n_w = predicted tokens of window w)

(``n_w G_w**2`` estimates the per-token Fisher when tokens are independent, so the predictions are
in nats per token.) To second order, a perturbation ``dW`` raises the loss by
``1/2 E[<G, dW>^2]``; with the diagonal approximation (independent coordinates) that is

    D(dW) = 1/2 sum_ij F_ij dW_ij**2                                              (*)

**Quantization** of a matrix ``X`` with relative squared error ``eps_X(q) = ||X - Q_q(X)||^2 /
||X||^2`` (measured by :func:`acip.quant.optimize.measure_rates`) is modelled as independent errors
of variance ``eps * X_ij**2`` on every entry (the float8 codes' error is relative), so by (*)
``D = eps_X(q) * S(X)`` with ``S(X) = 1/2 sum_ij F^X_ij X_ij**2``, ``F^X`` the Fisher of ``X``'s
entries.

**Truncation** of an SVD-parametrized layer (:class:`acip.core.svd_linear.SVDLinear`, ``W = U D``
with ``U = c * ortho``: out x k, ``D = base``: k x in, direction ``j`` = column ``u_j`` and row
``d_j``) drops directions; dropping ``j`` is ``dW = -u_j d_j^T``, whose first-order effect is
``-u_j^T G d_j`` (the gradient of direction ``j``'s mask gate), so with the coordinates taken as
independent the directions add up. Per direction ``j`` (from the same passes, with
``h = x D^T`` and ``p = delta U``)::

    t_j = 1/2 (1/N) sum_w n_w (u_j^T G_w d_j)^2                    truncating j
    a_j = 1/2 sum_i F^U_ij U_ij^2,    F^U = (1/N) sum_w n_w (delta^T h)^2       U's column j
    b_j = 1/2 sum_k F^D_jk D_jk^2,    F^D = (1/N) sum_w n_w (p^T x)^2           D's row j

and the predicted loss increase of layer ``l`` at rank ``r`` (its ``r`` best directions in the
score map's order, ``top r``) with storage ``q`` is **the one formula**::

    D_l(r, q) = sum_{j not in top r} t_j  +  eps_up(q) * sum_{j in top r} a_j  +  eps_down(q) * sum_{j in top r} b_j
    D_l(dense, q) = sum_{j not kept} t_j  +  eps_W(q) * S(W_stored)               (a layer stored as one matrix)

(float storage: ``eps = 0``). A plain ``nn.Linear`` (``quantize_`` on any model) has only the
second line with nothing truncated: ``D_l(q) = eps_W(q) * S(W)``.

Without calibration data the same formula runs with the Fisher replaced by the singular values
(every layer's relative error counts the same, as in the singular-value score map):
``t_j = a_j = b_j = s_j^2 / sum_i s_i^2`` and ``S(W_stored) = `` the kept energy fraction.

The reference point of the passes is the uncompressed model: every direction active, no
adapter (a trained adapter compensates for the directions that training pruned, so "all
directions plus the adapter" is not a model that was ever good).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .config import EntropyQuantConfig

__all__ = ["BudgetError", "LayerFisher", "fisher", "lower_hull", "allocate_hulls", "calibration_batches",
           "calibration_loss", "plan_layer_lams", "LAM_LADDER"]

LAM_LADDER = (0.125, 0.177, 0.25, 0.354, 0.5, 0.707, 1.0, 1.41, 2.0, 2.83, 4.0, 5.66, 8.0)
"""Multiples of ``cfg.lam`` a layer may take with ``allocation="sensitivity"`` (steps of sqrt(2); one
sweep of the search measures them all)."""


class BudgetError(ValueError):
    """A byte budget that no setting reaches (below the smallest one)."""


# ---------------------------------------------------------------------------------------------------- data
def calibration_batches(calib: Any) -> list[dict[str, torch.Tensor]]:
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


def _windows(batches: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Every row of every batch as its own batch of one (the Fisher needs per-window gradients)."""
    for b in batches:
        n = b["input_ids"].shape[0]
        for i in range(n):
            yield {k: (v[i: i + 1] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
                   for k, v in b.items()}


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean language-model loss of ``model`` over ``batches`` (from :func:`calibration_batches`)."""
    dev = next(model.parameters()).device
    total = 0.0
    for b in batches:
        total += float(model(**{k: v.to(dev) for k, v in b.items()}).loss)
    return total / len(batches)


# ---------------------------------------------------------------------------------------------------- the passes
@dataclass
class LayerFisher:
    """What the passes measured for one layer (see the module docstring)."""

    weight: torch.Tensor  # F, out x in (float32)
    t: torch.Tensor | None = None  # (k,) per direction, truncation
    a: torch.Tensor | None = None  # (k,) per direction, U's column
    b: torch.Tensor | None = None  # (k,) per direction, D's row

    def sensitivity(self, W: torch.Tensor) -> float:
        """``S(W) = 1/2 sum F W^2``: predicted loss increase per unit relative squared error of ``W``."""
        return 0.5 * float((self.weight * W.detach().float().pow(2)).sum())


def fisher(model: nn.Module, batches: Any, layers: dict[str, nn.Module],
           directions: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
           progress: Callable[[str], None] | None = None) -> dict[str, LayerFisher]:
    """The diagonal empirical Fisher of every layer in ``layers`` (name -> module computing ``y = W x (+ b)``
    on its first input), one forward+backward per calibration window (see the module docstring).

    ``directions``: for SVD-parametrized layers, ``name -> (ortho, base, c)`` (``U = c * ortho``:
    out x k, ``D = base``: k x in) to measure the per-direction ``t``, ``a``, ``b`` too. The model's parameters get no gradient (autograd
    differentiates the loss only with respect to the layers' outputs); the model is left in the
    mode (train/eval) it came in.
    """
    batches = calibration_batches(batches)
    say = progress or (lambda _line: None)
    directions = directions or {}
    dev = next(model.parameters()).device
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise TypeError(f"the Fisher passes need a model with get_input_embeddings(), got {type(model).__name__}")
    acc: dict[str, dict[str, torch.Tensor]] = {}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []

    def grab(name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name not in seen and isinstance(out, torch.Tensor) and out.requires_grad:
                seen[name] = (args[0].detach(), out)
        return hook

    hooks.append(emb.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    for name, mod in layers.items():
        hooks.append(mod.register_forward_hook(grab(name)))
    was = model.training
    model.eval()
    t0 = time.perf_counter()
    n_win = 0
    frozen = no_grad_params(model)
    frozen.__enter__()
    try:
        for win in _windows(batches):
            seen.clear()
            with torch.enable_grad():
                out = model(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in win.items()})
                names = [n for n in layers if n in seen]
                grads = torch.autograd.grad(out.loss, [seen[n][1] for n in names], allow_unused=True)
            labels = win["labels"]
            n_tok = float(max(int((labels[:, 1:] != -100).sum()), 1))
            with torch.no_grad():
                for name, g in zip(names, grads):
                    if g is None:
                        continue
                    x = seen[name][0].reshape(-1, seen[name][0].shape[-1]).float()
                    d = g.reshape(-1, g.shape[-1]).float()
                    a = acc.setdefault(name, {})
                    G = d.t() @ x
                    _add(a, "weight", n_tok * G.pow_(2))
                    if name in directions:
                        U, D, c = directions[name]
                        U, D = U.detach().float() * c, D.detach().float()
                        h, p = x @ D.t(), d @ U
                        _add(a, "t", 0.5 * n_tok * (p * h).sum(0).pow(2))
                        _add(a, "a", 0.5 * n_tok * ((d.t() @ h).pow_(2) * U.pow(2)).sum(0))
                        _add(a, "b", 0.5 * n_tok * ((p.t() @ x).pow_(2) * D.pow(2)).sum(1))
            n_win += 1
            seen.clear()
            say(f"fisher: window {n_win}, {time.perf_counter() - t0:.1f}s")
    finally:
        for h in hooks:
            h.remove()
        frozen.__exit__(None, None, None)
        model.train(was)
    res = {}
    for name in layers:
        a = acc.get(name)
        if a is None:  # never reached by the loss (e.g. an unused layer): no sensitivity at all
            continue
        res[name] = LayerFisher(**{k: v / n_win for k, v in a.items()})
    return res


def _add(acc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in acc:
        acc[key] += value
    else:
        acc[key] = value.clone()


# ---------------------------------------------------------------------------------------------------- allocation
def lower_hull(nbytes: np.ndarray, damage: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of the points ``(bytes, damage)``, by increasing bytes.

    The first index is the cheapest point (least damage among equally cheap ones); along the hull
    damage strictly falls and the damage saved per byte (the slope) falls too.
    """
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


def allocate_hulls(points: list[tuple[np.ndarray, np.ndarray]], budget: float,
                   hulls: list[np.ndarray] | None = None) -> list[int]:
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


# ---------------------------------------------------------------------------------------------------- quantize_
def plan_layer_lams(model: nn.Module, targets: dict[str, nn.Linear], cfg: EntropyQuantConfig, calib: Any,
                    rows: int = 128, ladder: tuple[float, ...] = LAM_LADDER,
                    progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Per-layer lam for ``allocation="sensitivity"``, at the bytes uniform ``cfg.lam`` would take.

    Candidates ``lam = cfg.lam * m`` (``m`` in ``ladder``); per layer ``D_l(lam) = eps_l(lam) * S(W_l)``
    (the module docstring's formula for a plain linear, with the Fisher of :func:`fisher`), and
    bytes and ``eps`` from :func:`acip.quant.optimize.measure_rates`. :func:`allocate_hulls`
    minimises ``sum_l D_l`` with the summed bytes at most those of ``cfg.lam`` everywhere, so layers
    whose error costs more loss get a smaller lam (more bits) and robust layers pay for it.
    """
    from .optimize import measure_rates

    names = [n for n, lin in targets.items() if lin.weight.numel()]
    fis = fisher(model, calib, {n: targets[n] for n in names}, progress=progress)
    lams = sorted({cfg.lam * m for m in ladder} | {cfg.lam}) if cfg.lam > 0 else [0.0]
    base = lams.index(cfg.lam)
    points, budget = [], 0.0
    for name in names:
        w = targets[name].weight
        sens = fis[name].sensitivity(w) if name in fis else 0.0
        got = measure_rates(w, lams, rows=rows, name=name, base=cfg)
        out_f, n = w.shape[0], w.numel()
        nbytes = np.array([b * n / 8 + fx + rb * out_f for b, fx, rb in zip(got["bits"], got["fixed"], got["row_bytes"])])
        points.append((nbytes, sens * np.asarray(got["eps"])))
        budget += float(nbytes[base])
    pick = allocate_hulls(points, budget)
    return {name: float(lams[i]) for name, i in zip(names, pick)}


@contextlib.contextmanager
def no_grad_params(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
