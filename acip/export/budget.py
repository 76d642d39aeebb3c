"""Byte-budget export: ``acip.export(source, size_mb=40)`` or ``bits_per_param=3.0``.

Given a byte budget ``B`` for the target layers, choose for every target layer ``l`` its rank
``r`` (its ``r`` best directions in the score map's order) and its storage ``q`` (float factors
as exported, or the entropy quantizer at one of a few ``lam`` values) jointly, to minimise the
predicted loss increase ``sum_l D_l(r_l, q_l)`` subject to ``sum_l bytes_l(r_l, q_l) <= B``; then
build that model (export at those ranks, quantize each layer with its ``lam``).

Cost model (per layer, measured once, cached next to the score map)::

    D_l(r, q) = w_l * [ T_l(r) + eps_l(q) * (1 - T_l(r)) ]
    T_l(r)    = sum_{j not in top r} s_j^2 / sum_j s_j^2             energy the truncation drops
    eps_l(q)  = eps_up(q) + eps_down(q)   (low rank)   or  eps_W(q)   (stored dense)
    eps_X(q)  = ||X - Q_q(X)||_F^2 / ||X||_F^2                      measured on the factor X

``s_j`` are the layer's singular values and "top r" is the score map's per-layer order (for a
trained map it is not the singular-value order). The quantization term assumes the relative
error of a factor spreads evenly over its kept directions, so it scales with the kept energy
``1 - T_l(r)``. ``eps`` and the rate of each ``lam`` are measured by quantizing the layer's
factors (at its largest low-rank rank) and its dense weight once per ``lam``, on at most 128
random rows (rows are independent in the quantizer's objective): bits per code from the coded
stream, plus the frequency table, sha256 and one scale per row. A layer stored dense (``r``
past break-even, ``r * (in + out) > in * out``) keeps every direction (``T = 0``) unless it has
a trained adapter.

``w_l`` is 1 without calibration data (every layer's relative error counts the same, as in the
singular-value score map). With ``calib=`` batches it is the measured loss increase when that
layer alone is truncated to half its parameters, divided by ``T_l`` there, so that ``D`` is a
predicted loss increase in nats (each layer's ``w_l`` is floored at 1% of the median).

Bytes of a point: ``bits(q) / 8 * params + tables + scales`` (float storage: ``element_size *
params``), plus the bias. The allocation is a Lagrangian over each layer's lower convex hull of
``(bytes, D)`` points (:func:`acip.quant.optimize.allocate_hulls`: the multiplier's bisection
done exactly by one sort of the hull slopes), then a greedy fill of the budget left over. After
building, the stored bytes of the target layers are counted from the model's tensors (what
``save_pretrained`` writes; ``acip.quant.report``'s coded bytes, tables, scales and sha256
included); above the budget, or more than 3% below it, the target is rescaled by the measured
error and the model rebuilt (at most ``MAX_BUILDS`` builds; never a result above the budget).

MB means 10^6 bytes, counted over the target layers only (embeddings and norms are extra).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.io import read_tensors, save_tensors
from ..core.parametrize import ACIPModel
from ..core.score_map import ScoreMap
from ..quant.optimize import (BudgetError, allocate_hulls, calibration_batches, calibration_loss, lower_hull,
                              measure_rates)

__all__ = ["CostModel", "BudgetError", "Allocation", "cost_model", "allocate", "export_budget", "target_bytes",
           "COST_FILE", "DEFAULT_LAMS", "MB"]

MB = 1_000_000
COST_FILE = "budget_cost.safetensors"
COST_FORMAT = "acip.budget_cost/1"
DEFAULT_LAMS = (0.0, 1.0, 3.9, 14.5, 58.0, 200.0)
SAMPLE_ROWS = 128
MAX_BUILDS = 5
TOLERANCE = 0.03
_MEMO: dict[str, "CostModel"] = {}
_FIELDS = ("bits", "eps", "fixed", "row_bytes")  # (L, Q, 3) arrays: factors up, down and the dense weight


@dataclass
class CostModel:
    """Per-layer measurements the allocation needs (see the module docstring for the formula)."""

    names: list[str]
    shapes: list[tuple[int, int]]  # (out, in)
    kept: list[np.ndarray]  # per layer, K(r) = 1 - T(r) for r = 0..k
    rmax: np.ndarray  # (L,) largest low-rank rank (below break-even)
    rdense: np.ndarray  # (L,) rank exported for a dense-stored layer (k, or break-even for an adapted layer)
    weight: np.ndarray  # (L,) w_l
    bias_bytes: np.ndarray  # (L,)
    float_bytes: int  # element size of the exported float weights
    lams: tuple[float, ...]
    bits: np.ndarray  # (L, Q, 3) coded bits per weight for (up, down, dense), Q = 1 + len(lams)
    eps: np.ndarray
    fixed: np.ndarray
    row_bytes: np.ndarray
    key: str
    meta: dict = field(default_factory=dict)
    _points: list | None = field(default=None, repr=False)
    _hulls: list | None = field(default=None, repr=False)

    @property
    def storages(self) -> list[str]:
        return [f"float{8 * self.float_bytes}"] + [f"entropy:lam={lam:g}" for lam in self.lams]

    @property
    def dense_params(self) -> int:
        return int(sum(o * i for o, i in self.shapes) + self.bias_bytes.sum() / self.float_bytes)

    def points(self, l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(bytes, damage, rank, storage index)`` of every setting of layer ``l``."""
        out, inn = self.shapes[l]
        K, w, bias = self.kept[l], float(self.weight[l]), float(self.bias_bytes[l])
        Q = len(self.lams) + 1
        b_all, d_all, r_all, q_all = [], [], [], []
        r = np.arange(1, int(self.rmax[l]) + 1, dtype=np.float64)
        if r.size:
            up, dn = out * r, r * inn
            for q in range(Q):
                bits, eps, fix, row = (getattr(self, f)[l, q] for f in _FIELDS)
                nb = bits[0] * up / 8 + bits[1] * dn / 8 + fix[0] + fix[1] + row[0] * out + row[1] * r + bias
                kr = K[r.astype(np.int64)]
                b_all.append(nb)
                d_all.append(w * ((1 - kr) + (eps[0] + eps[1]) * kr))
                r_all.append(r.astype(np.int64))
                q_all.append(np.full(r.size, q))
        rd = int(self.rdense[l])
        for q in range(Q):
            bits, eps, fix, row = (getattr(self, f)[l, q] for f in _FIELDS)
            b_all.append(np.array([bits[2] * out * inn / 8 + fix[2] + row[2] * out + bias]))
            d_all.append(np.array([w * ((1 - K[rd]) + eps[2] * K[rd])]))
            r_all.append(np.array([rd]))
            q_all.append(np.array([q]))
        return tuple(np.concatenate(x) for x in (b_all, d_all, r_all, q_all))  # type: ignore[return-value]

    def _prepare(self) -> None:
        if self._points is None:
            self._points = [self.points(l) for l in range(len(self.names))]
            self._hulls = [lower_hull(p[0], p[1]) for p in self._points]

    def min_bytes(self) -> float:
        self._prepare()
        return float(sum(p[0][h[0]] for p, h in zip(self._points, self._hulls)))

    def max_bytes(self) -> float:
        """Bytes of the least-damage setting of every layer (more budget buys nothing)."""
        self._prepare()
        return float(sum(p[0][h[-1]] for p, h in zip(self._points, self._hulls)))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        tensors = {f: torch.from_numpy(np.ascontiguousarray(getattr(self, f))) for f in _FIELDS}
        for f in ("rmax", "rdense", "weight", "bias_bytes"):
            tensors[f] = torch.from_numpy(np.ascontiguousarray(getattr(self, f)))
        for l, k in enumerate(self.kept):
            tensors[f"kept.{l}"] = torch.from_numpy(np.ascontiguousarray(k))
        header = {"format": COST_FORMAT, "key": self.key, "names": json.dumps(self.names),
                  "shapes": json.dumps(self.shapes), "lams": json.dumps(list(self.lams)),
                  "float_bytes": str(self.float_bytes), "meta": json.dumps(self.meta)}
        return save_tensors(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostModel":
        t, h = read_tensors(path, what="budget cost model")
        if h.get("format") != COST_FORMAT:
            raise ValueError(f"{str(path)!r} is not an acip budget cost model (format={h.get('format')!r})")
        names = json.loads(h["names"])
        return cls(names=names, shapes=[tuple(s) for s in json.loads(h["shapes"])],
                   kept=[t[f"kept.{l}"].numpy() for l in range(len(names))],
                   rmax=t["rmax"].numpy(), rdense=t["rdense"].numpy(), weight=t["weight"].numpy(),
                   bias_bytes=t["bias_bytes"].numpy(), float_bytes=int(h["float_bytes"]),
                   lams=tuple(json.loads(h["lams"])), key=h["key"], meta=json.loads(h["meta"]),
                   **{f: t[f].numpy() for f in _FIELDS})


@dataclass
class Allocation:
    """The chosen setting per layer, with its predicted bytes and damage."""

    ranks: dict[str, int]
    storage: dict[str, str]
    lam: dict[str, float | None]
    nbytes: dict[str, float]
    damage: dict[str, float]
    target: float  # the byte target it was solved for

    @property
    def total_bytes(self) -> float:
        return float(sum(self.nbytes.values()))

    @property
    def total_damage(self) -> float:
        return float(sum(self.damage.values()))


def allocate(cm: CostModel, budget_bytes: float) -> Allocation:
    """The least-damage setting per layer whose predicted bytes sum to at most ``budget_bytes``."""
    cm._prepare()
    try:
        pick = allocate_hulls([(p[0], p[1]) for p in cm._points], budget_bytes, cm._hulls)
    except BudgetError:
        raise _too_small(cm, budget_bytes) from None
    st = cm.storages
    ranks, storage, lam, nb, dmg = {}, {}, {}, {}, {}
    for l, (name, i) in enumerate(zip(cm.names, pick)):
        b, d, r, q = (x[i] for x in cm._points[l])
        ranks[name], storage[name] = int(r), st[int(q)]
        lam[name] = None if q == 0 else float(cm.lams[int(q) - 1])
        nb[name], dmg[name] = float(b), float(d)
    return Allocation(ranks, storage, lam, nb, dmg, float(budget_bytes))


def _too_small(cm: CostModel, budget: float) -> BudgetError:
    low = cm.min_bytes()
    return BudgetError(
        f"a budget of {budget / MB:.4f} MB ({8 * budget / cm.dense_params:.3f} bits per target parameter) is below "
        f"the smallest setting, {low / MB:.4f} MB = {8 * low / cm.dense_params:.3f} bits per target parameter "
        f"(every target layer at rank 1 with its cheapest storage, lam={max(cm.lams) if cm.lams else 0:g}); "
        f"ask for at least size_mb={math.ceil(low / MB * 1e4) / 1e4} or bits_per_param="
        f"{math.ceil(8 * low / cm.dense_params * 1e3) / 1e3}")


# ---------------------------------------------------------------------------------------------------- measuring
def _layer_rates(layer: Any, order: torch.Tensor, rmax: int, rdense: int, adapters: bool, lams: tuple[float, ...],
                 rows: int, name: str) -> dict[str, np.ndarray]:
    """(Q, 3) arrays of bits / eps / fixed / row_bytes for (up, down, dense) of one layer."""
    fb = layer.base.element_size()
    res = {f: np.zeros((len(lams) + 1, 3)) for f in _FIELDS}
    res["bits"][0, :] = 8.0 * fb  # float storage: exact, no tables
    mats: list[torch.Tensor | None] = [None, None, None]
    if rmax > 0:
        mats[0], mats[1] = layer.factors(order[:rmax].to(layer.base.device), with_lora=adapters)
    keep = torch.sort(order[:rdense]).values.to(layer.base.device)
    mats[2] = layer.dense_weight(keep, with_lora=adapters)
    for j, m in enumerate(mats):
        if m is None or m.numel() == 0:
            continue
        got = measure_rates(m, lams, rows=rows, seed=j, name=f"{name}[{('up', 'down', 'dense')[j]}]")
        for f in _FIELDS:
            res[f][1:, j] = got[f]
    return res


@torch.no_grad()
def _sensitivity(pm: ACIPModel, sm: ScoreMap, kept: list[np.ndarray], batches: list[dict]) -> np.ndarray:
    """``w_l``: loss increase with layer ``l`` alone at half its parameters, per unit of dropped energy."""
    layers = pm.svd_layers()
    alloc = sm.allocator()
    at = {n: i for i, n in enumerate(alloc.names)}
    was = pm.model.training
    pm.model.eval()
    try:
        pm.unprune()
        base = calibration_loss(pm.model, batches)
        delta, dropped = [], []
        for l, (name, layer) in enumerate(layers.items()):
            r50 = max(1, min(layer.max_rank, (layer.in_features * layer.out_features) // (2 * (layer.in_features + layer.out_features))))
            keep = torch.zeros(layer.max_rank, dtype=torch.bool, device=layer.mask.device)
            keep[alloc.order_in_layer[at[name]][:r50].to(keep.device)] = True
            layer.keep = keep
            try:
                delta.append(calibration_loss(pm.model, batches) - base)
            finally:
                layer.keep = None
            dropped.append(1.0 - float(kept[l][r50]))
    finally:
        pm.model.train(was)
    delta_a, dropped_a = np.asarray(delta), np.maximum(np.asarray(dropped), 1e-12)
    w = np.maximum(delta_a, 0.0) / dropped_a
    floor = 0.01 * float(np.median(w[w > 0])) if (w > 0).any() else 1.0
    return np.maximum(w, floor)


def _key(pm: ACIPModel, sm: ScoreMap, adapters: bool, lams: tuple[float, ...], rows: int,
         batches: list[dict] | None) -> str:
    h = hashlib.sha256()
    calib = None
    if batches is not None:
        hc = hashlib.sha256()
        for b in batches:
            hc.update(b["input_ids"].cpu().numpy().astype(np.int64).tobytes())
        calib = hc.hexdigest()
    fb = next(iter(pm.svd_layers().values())).base.element_size()
    h.update(json.dumps([COST_FORMAT, sm.digest(), pm.acip_config.digest(), adapters, list(lams), rows, calib, fb,
                         sorted(pm.liftable_layers())]).encode())
    return h.hexdigest()


def cost_model(pm: ACIPModel, sm: ScoreMap, *, adapters: bool = True, lams: tuple[float, ...] = DEFAULT_LAMS,
               calib: Any = None, cache: str | os.PathLike | None = None, rows: int = SAMPLE_ROWS,
               progress: Callable[[str], None] | None = None) -> CostModel:
    """Measure (or load from ``cache`` / this process's memo) the cost model of ``pm`` with ``sm``'s order."""
    lams = tuple(sorted(float(x) for x in lams))
    batches = calibration_batches(calib) if calib is not None else None
    key = _key(pm, sm, adapters, lams, rows, batches)
    if key in _MEMO:
        return _MEMO[key]
    if cache is not None and Path(cache).is_file():
        try:
            cm = CostModel.load(cache)
        except Exception:  # noqa: BLE001 - a damaged or foreign cache is measured again
            cm = None
        if cm is not None and cm.key == key:
            _MEMO[key] = cm
            return cm
    say = progress or (lambda _line: None)
    t0 = time.perf_counter()
    layers = pm.svd_layers()
    alloc = sm.allocator()
    lift = pm.liftable_layers() if adapters else set(layers)
    kept, rmax, rdense, bias_b, per = [], [], [], [], []
    at = {n: i for i, n in enumerate(alloc.names)}
    for l, (name, layer) in enumerate(layers.items()):
        order = alloc.order_in_layer[at[name]]
        s2 = layer.singular_values.detach().double().cpu().pow(2)
        k = int(s2.numel())
        K = np.concatenate([[0.0], torch.cumsum(s2[order], 0).numpy() / max(float(s2.sum()), 1e-300)])
        K[-1] = 1.0
        brk = (layer.in_features * layer.out_features) // (layer.in_features + layer.out_features) + 1
        rm = min(k, brk - 1)
        rd = k if name in lift else min(k, brk)
        kept.append(K)
        rmax.append(rm)
        rdense.append(rd)
        bias_b.append(0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size())
        per.append(_layer_rates(layer, order, rm, rd, adapters, lams, rows, name))
        say(f"cost model: {name} ({l + 1}/{len(layers)}), {time.perf_counter() - t0:.1f}s")
    weight = np.ones(len(layers))
    if batches is not None:
        weight = _sensitivity(pm, sm, kept, batches)
        say(f"cost model: sensitivities from {len(batches)} calibration batches, {time.perf_counter() - t0:.1f}s")
    fb = next(iter(layers.values())).base.element_size()
    cm = CostModel(names=list(layers), shapes=[(l.out_features, l.in_features) for l in layers.values()], kept=kept,
                   rmax=np.asarray(rmax, dtype=np.int64), rdense=np.asarray(rdense, dtype=np.int64), weight=weight,
                   bias_bytes=np.asarray(bias_b, dtype=np.float64), float_bytes=int(fb), lams=lams, key=key,
                   meta={"calibrated": batches is not None, "seconds": round(time.perf_counter() - t0, 2),
                         "score_map": sm.method},
                   **{f: np.stack([p[f] for p in per]) for f in _FIELDS})
    _MEMO[key] = cm
    if cache is not None:
        cm.save(cache)
    return cm


# ---------------------------------------------------------------------------------------------------- building
def target_bytes(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Stored bytes of each target layer of an exported model: every tensor under it (as
    ``save_pretrained`` writes it) plus the sha256 each entropy-coded weight keeps in the config
    (the count of ``acip.quant.report``: streams, tables, scales, biases)."""
    from ..quant.module import EntQuantLinear

    out = {}
    for name in names:
        mod = model.get_submodule(name)
        seen, total = set(), 0
        for t in list(mod.parameters()) + list(mod.buffers()):
            if t.data_ptr() in seen and t.numel():
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        total += 32 * sum(isinstance(m, EntQuantLinear) for m in mod.modules())
        out[name] = int(total)
    return out


def _build(pm: ACIPModel, sm: ScoreMap, adapters: bool, a: Allocation) -> nn.Module:
    from ..quant import EntropyQuantConfig, quantize_
    from . import export

    new = export(pm, score_map=sm, adapters=adapters, _ranks=a.ranks)
    by_lam: dict[float, list[str]] = {}
    for name, lam in a.lam.items():
        if lam is not None:
            by_lam.setdefault(lam, []).append(name)
    for lam, names in sorted(by_lam.items()):
        quantize_(new, EntropyQuantConfig(lam=lam, target_modules=names))
    if by_lam:
        new.config.acip_quant = {"allocation": "budget", "lams": {n: a.lam[n] for n in a.lam}}
    return new


def export_budget(source: Any, *, size_mb: float | None = None, bits_per_param: float | None = None,
                  model: Any = None, score_map: ScoreMap | None = None, adapters: bool | str = "auto",
                  calib: Any = None,
                  lams: tuple[float, ...] | None = None, cache: str | os.PathLike | None = None,
                  progress: Callable[[str], None] | None = None) -> nn.Module:
    """Build the least-damage export whose target layers store at most the budget (see module docstring).

    ``size_mb`` (10^6 bytes) or ``bits_per_param`` (over the target layers' dense parameters) sets the
    budget. ``calib``: token-id batches for the per-layer sensitivities (else data-free). ``cache``:
    where the cost model is kept (default: ``budget_cost.safetensors`` in a run directory source).
    Per-layer choices, predicted and measured bytes are in ``model.config.acip_export["budget"]``.
    """
    from . import resolve

    if (size_mb is None) == (bits_per_param is None):
        raise TypeError("pass exactly one of size_mb= (10^6 bytes of the target layers) or bits_per_param=")
    for nm, v in (("size_mb", size_mb), ("bits_per_param", bits_per_param)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise ValueError(f"{nm} must be a positive number, got {v!r}")
    say = progress or (lambda _line: None)
    pm, sm = resolve(source, model, score_map, adapters)
    if isinstance(adapters, str) and adapters == "auto":  # no ratio: adapters where the run found them to help
        from .auto import decide_adapters

        adapters = decide_adapters(pm, sm, None)
    if cache is None and isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        cache = (p.parent if p.is_file() else p) / COST_FILE
    t0 = time.perf_counter()
    cm = cost_model(pm, sm, adapters=adapters, lams=DEFAULT_LAMS if lams is None else lams, calib=calib,
                    cache=cache, progress=progress)
    budget = float(size_mb) * MB if size_mb is not None else float(bits_per_param) * cm.dense_params / 8
    if budget < cm.min_bytes():
        raise _too_small(cm, budget)
    top = cm.max_bytes()
    target, best, tried, built = min(budget, top), None, [], set()
    for _ in range(MAX_BUILDS):
        a = allocate(cm, target)
        sig = tuple(sorted((n, a.ranks[n], a.storage[n]) for n in a.ranks))
        if sig in built:  # the rescaled target chose a setting already measured
            if best is not None:
                break
            target *= 0.99
            continue
        built.add(sig)
        new = _build(pm, sm, adapters, a)
        got = target_bytes(new, cm.names)
        used = sum(got.values())
        tried.append({"target": round(target), "predicted": round(a.total_bytes), "measured": used})
        say(f"budget {budget:.0f} B: target {target:.0f}, predicted {a.total_bytes:.0f}, measured {used} bytes")
        if used <= budget and (best is None or used > best[2]):
            best = (new, a, used, got)
        if used <= budget and (used >= (1 - TOLERANCE) * budget or a.total_bytes >= top - 1):
            break
        target = min(top, target * budget / used * (0.998 if used > budget else 0.999))
    if best is None:
        raise BudgetError(f"no build fitted {budget:.0f} bytes after {MAX_BUILDS} tries ({tried}); the measured bytes "
                          f"stay above the predicted ones: ask for a slightly larger budget")
    new, a, used, got = best
    new.config.acip_export["budget"] = {
        "budget_bytes": round(budget), "stored_bytes": used, "dense_params": cm.dense_params,
        "bits_per_param": 8 * used / cm.dense_params, "predicted_damage": a.total_damage,
        "calibrated": bool(cm.meta.get("calibrated")), "builds": tried,
        "seconds": round(time.perf_counter() - t0, 2),
        "layers": {n: {"rank": a.ranks[n], "storage": a.storage[n], "bytes": got[n],
                       "predicted_bytes": round(a.nbytes[n]), "damage": a.damage[n],
                       "weight": float(cm.weight[i])} for i, n in enumerate(cm.names)},
    }
    return new
