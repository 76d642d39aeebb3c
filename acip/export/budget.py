"""Byte-budget export: ``acip.export(source, size_mb=40)`` or ``bits_per_param=3.0``.

Given a byte budget ``B`` for the target layers, choose for every target layer ``l`` its rank
``r`` (its ``r`` best directions in the score map's order) and its storage ``q`` (float factors
as exported, or the entropy quantizer at one of a few ``lam`` values) jointly, to minimise the
predicted loss increase ``sum_l D_l(r_l, q_l)`` subject to ``sum_l bytes_l(r_l, q_l) <= B``; then
build that model (export at those ranks, quantize each layer with its ``lam``).

Cost model (per layer, measured once, cached next to the score map): the predicted loss increase
is the one formula of :mod:`acip.quant.sensitivity` (the home of the sensitivity concept, shared
with ``EntropyQuantConfig(allocation="sensitivity")``)::

    D_l(r, q)     = sum_{j not in top r} t_j + eps_up(q) * sum_{j in top r} a_j + eps_down(q) * sum_{j in top r} b_j
    D_l(dense, q) = sum_{j not kept} t_j + eps_W(q) * S_l                        (stored as one matrix)
    eps_X(q)      = ||X - Q_q(X)||_F^2 / ||X||_F^2                               measured on the factor X

"top r" is the score map's per-layer order (for a trained map it is not the singular-value
order). With ``calib=`` batches of training text, ``t_j`` (truncating direction ``j``), ``a_j`` /
``b_j`` (the Fisher-weighted energy of ``j``'s column of the up factor / row of the down factor)
and ``S_l = 1/2 sum F W_stored^2`` come from the diagonal empirical Fisher of one
forward+backward pass per calibration window (:func:`acip.quant.sensitivity.fisher`), so ``D``
is a predicted loss increase in nats per token. Without calibration data ``t_j = a_j = b_j =
s_j^2 / sum s^2`` (the energy of the layer's singular values, every layer's relative error
counting the same) and ``S_l`` is the kept energy.

``eps`` and the rate of each ``lam`` are measured by one sweep of the exact exponent search
(:func:`acip.quant.optimize.measure_rates`; the search is also the quantizer the build uses, so a
sampled row gets the exponent it will get) over the layer's factors (at its largest low-rank rank)
and its dense weight, on at most ``SAMPLE_ROWS`` random rows (rows are independent in the
quantizer's objective): bits per code from the codes' histogram under the coder's frequency
table, plus the table, sha256 and one scale per row. Because one sweep serves every ``lam``,
``DEFAULT_LAMS`` holds 11 rates. A layer stored dense (``r`` past break-even, ``r * (in + out) > in
* out``) keeps every direction unless it has a trained adapter.

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
from ..quant.optimize import measure_rates
from ..quant.sensitivity import BudgetError, LayerFisher, allocate_hulls, calibration_batches, fisher, lower_hull

__all__ = ["CostModel", "BudgetError", "Allocation", "cost_model", "allocate", "export_budget", "target_bytes",
           "COST_FILE", "DEFAULT_LAMS", "MB"]

MB = 1_000_000
COST_FILE = "budget_cost.safetensors"
COST_FORMAT = "acip.budget_cost/2"
DEFAULT_LAMS = (0.0, 0.5, 1.0, 2.0, 3.9, 7.5, 14.5, 29.0, 58.0, 116.0, 200.0)
SAMPLE_ROWS = 128
MAX_BUILDS = 5
TOLERANCE = 0.03
_MEMO: dict[str, "CostModel"] = {}
_FIELDS = ("bits", "eps", "fixed", "row_bytes")  # (L, Q, 3) arrays: factors up, down and the dense weight
_PER_LAYER = ("trunc", "quant_up", "quant_down")  # per layer, (k + 1,) arrays over the rank


@dataclass
class CostModel:
    """Per-layer measurements the allocation needs (see the module docstring for the formula)."""

    names: list[str]
    shapes: list[tuple[int, int]]  # (out, in)
    trunc: list[np.ndarray]  # per layer, sum_{j not in top r} t_j for r = 0..k
    quant_up: list[np.ndarray]  # per layer, sum_{j in top r} a_j for r = 0..k
    quant_down: list[np.ndarray]  # per layer, sum_{j in top r} b_j for r = 0..k
    rmax: np.ndarray  # (L,) largest low-rank rank (below break-even)
    rdense: np.ndarray  # (L,) rank exported for a dense-stored layer (k, or break-even for an adapted layer)
    dense_sens: np.ndarray  # (L,) S_l of the weight a dense-stored layer keeps
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
        T, A, Bq, bias = self.trunc[l], self.quant_up[l], self.quant_down[l], float(self.bias_bytes[l])
        Q = len(self.lams) + 1
        b_all, d_all, r_all, q_all = [], [], [], []
        r = np.arange(1, int(self.rmax[l]) + 1, dtype=np.int64)
        if r.size:
            up, dn = out * r, r * inn
            for q in range(Q):
                bits, eps, fix, row = (getattr(self, f)[l, q] for f in _FIELDS)
                nb = bits[0] * up / 8 + bits[1] * dn / 8 + fix[0] + fix[1] + row[0] * out + row[1] * r + bias
                b_all.append(nb)
                d_all.append(T[r] + eps[0] * A[r] + eps[1] * Bq[r])
                r_all.append(r)
                q_all.append(np.full(r.size, q))
        rd = int(self.rdense[l])
        for q in range(Q):
            bits, eps, fix, row = (getattr(self, f)[l, q] for f in _FIELDS)
            b_all.append(np.array([bits[2] * out * inn / 8 + fix[2] + row[2] * out + bias]))
            d_all.append(np.array([T[rd] + eps[2] * float(self.dense_sens[l])]))
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
        for f in ("rmax", "rdense", "dense_sens", "bias_bytes"):
            tensors[f] = torch.from_numpy(np.ascontiguousarray(getattr(self, f)))
        for f in _PER_LAYER:
            for l, k in enumerate(getattr(self, f)):
                tensors[f"{f}.{l}"] = torch.from_numpy(np.ascontiguousarray(k))
        header = {"format": COST_FORMAT, "key": self.key, "names": json.dumps(self.names),
                  "shapes": json.dumps(self.shapes), "lams": json.dumps(list(self.lams)),
                  "float_bytes": str(self.float_bytes), "meta": json.dumps(self.meta)}
        return save_tensors(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostModel":
        t, h = read_tensors(path, what="budget cost model")
        if h.get("format") != COST_FORMAT:
            raise ValueError(f"{str(path)!r} is not an acip budget cost model of this version "
                             f"(format={h.get('format')!r}, expected {COST_FORMAT!r})")
        names = json.loads(h["names"])
        return cls(names=names, shapes=[tuple(s) for s in json.loads(h["shapes"])],
                   **{f: [t[f"{f}.{l}"].numpy() for l in range(len(names))] for f in _PER_LAYER},
                   rmax=t["rmax"].numpy(), rdense=t["rdense"].numpy(), dense_sens=t["dense_sens"].numpy(),
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
                 rows: int, name: str, fis: LayerFisher | None = None, quant: Any = None) -> dict[str, Any]:
    """(Q, 3) arrays of bits / eps / fixed / row_bytes for (up, down, dense) of one layer, and
    ``dense_sens``: ``S`` of the dense weight it would store (None without ``fis``)."""
    fb = layer.base.element_size()
    res: dict[str, Any] = {f: np.zeros((len(lams) + 1, 3)) for f in _FIELDS}
    res["bits"][0, :] = 8.0 * fb  # float storage: exact, no tables
    mats: list[torch.Tensor | None] = [None, None, None]
    if rmax > 0:
        mats[0], mats[1] = layer.factors(order[:rmax].to(layer.base.device), with_lora=adapters)
    keep = torch.sort(order[:rdense]).values.to(layer.base.device)
    mats[2] = layer.dense_weight(keep, with_lora=adapters)
    for j, m in enumerate(mats):
        if m is None or m.numel() == 0:
            continue
        got = measure_rates(m, lams, rows=rows, seed=j, name=f"{name}[{('up', 'down', 'dense')[j]}]", base=quant)
        for f in _FIELDS:
            res[f][1:, j] = got[f]
    res["dense_sens"] = None if fis is None else fis.sensitivity(mats[2])
    return res


def _dense_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The uncompressed layer ``c * ortho @ base`` (every direction, no adapter), differentiable."""
    return nn.functional.linear(nn.functional.linear(x, layer.base) * layer.mask_scaling, layer.ortho, layer.bias)


def _fisher(pm: ACIPModel, batches: list[dict], progress: Callable[[str], None] | None) -> dict[str, LayerFisher]:
    """:func:`acip.quant.sensitivity.fisher` of every SVD layer of ``pm``, at the uncompressed model."""
    import functools

    layers = pm.svd_layers()
    for layer in layers.values():  # every direction, no adapter, whatever the masks and pruning say
        layer.forward = functools.partial(_dense_forward, layer)
    try:
        return fisher(pm.model, batches, dict(layers),
                      directions={n: (l.ortho, l.base, l.mask_scaling) for n, l in layers.items()},
                      progress=progress)
    finally:
        for layer in layers.values():
            del layer.forward


def _key(pm: ACIPModel, sm: ScoreMap, adapters: bool, lams: tuple[float, ...], rows: int,
         batches: list[dict] | None, quant: Any = None) -> str:
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
    if quant is not None and quant.fmt != "e4m3":  # what the rates depend on (e4m3: the keys of before the option)
        h.update(json.dumps([quant.fmt, quant.fallback, quant.max_rel_error]).encode())
    return h.hexdigest()


def cost_model(pm: ACIPModel, sm: ScoreMap, *, adapters: bool = True, lams: tuple[float, ...] = DEFAULT_LAMS,
               calib: Any = None, cache: str | os.PathLike | None = None, rows: int = SAMPLE_ROWS,
               progress: Callable[[str], None] | None = None, quant: Any = None) -> CostModel:
    """Measure (or load from ``cache`` / this process's memo) the cost model of ``pm`` with ``sm``'s order.

    ``calib``: token-id batches of *training* text for the Fisher passes (one forward+backward per
    window); without it the cost model is data-free (singular-value energies). ``quant``: the
    entropy quantizer's settings whose rates are measured (its ``fmt``; default ``EntropyQuantConfig()``)."""
    lams = tuple(sorted(float(x) for x in lams))
    batches = calibration_batches(calib) if calib is not None else None
    key = _key(pm, sm, adapters, lams, rows, batches, quant)
    if key in _MEMO:
        return _MEMO[key]
    if cache is not None and Path(cache).is_file():
        try:
            cm = CostModel.load(cache)
        except Exception:  # noqa: BLE001 - a damaged, foreign or older cache is measured again
            cm = None
        if cm is not None and cm.key == key:
            _MEMO[key] = cm
            return cm
    say = progress or (lambda _line: None)
    t0 = time.perf_counter()
    layers = pm.svd_layers()
    fis: dict[str, LayerFisher] = {}
    t_fisher = 0.0
    if batches is not None:
        fis = _fisher(pm, batches, progress)
        t_fisher = time.perf_counter() - t0
        say(f"cost model: Fisher of {len(layers)} layers from {sum(b['input_ids'].shape[0] for b in batches)} "
            f"calibration windows, {t_fisher:.1f}s")
    alloc = sm.allocator()
    lift = pm.liftable_layers() if adapters else set(layers)
    per_layer: dict[str, list[np.ndarray]] = {f: [] for f in _PER_LAYER}
    rmax, rdense, bias_b, per, dense_sens = [], [], [], [], []
    at = {n: i for i, n in enumerate(alloc.names)}
    for l, (name, layer) in enumerate(layers.items()):
        order = alloc.order_in_layer[at[name]]
        k = int(layer.max_rank)
        brk = (layer.in_features * layer.out_features) // (layer.in_features + layer.out_features) + 1
        rm = min(k, brk - 1)
        rd = k if name in lift else min(k, brk)
        f = fis.pop(name, None)
        if f is None:  # data-free: relative energy of the singular values, in the score map's order
            s2 = layer.singular_values.detach().double().cpu().pow(2)
            e = (s2[order] / max(float(s2.sum()), 1e-300)).numpy()
            t_j = a_j = b_j = e
        else:
            idx = order.to(f.t.device)
            t_j, a_j, b_j = (x.double().cpu().index_select(0, idx.cpu()).numpy() for x in (f.t, f.a, f.b))
        kept_a = np.concatenate([[0.0], np.cumsum(a_j)])
        kept_b = np.concatenate([[0.0], np.cumsum(b_j)])
        trunc = float(np.sum(t_j)) - np.concatenate([[0.0], np.cumsum(t_j)])
        trunc[-1] = 0.0
        per_layer["trunc"].append(np.maximum(trunc, 0.0))
        per_layer["quant_up"].append(kept_a)
        per_layer["quant_down"].append(kept_b)
        rmax.append(rm)
        rdense.append(rd)
        bias_b.append(0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size())
        got = _layer_rates(layer, order, rm, rd, adapters, lams, rows, name, f, quant)
        dense_sens.append(kept_a[rd] if got["dense_sens"] is None else got["dense_sens"])
        per.append(got)
        say(f"cost model: {name} ({l + 1}/{len(layers)}), {time.perf_counter() - t0:.1f}s")
    fb = next(iter(layers.values())).base.element_size()
    cm = CostModel(names=list(layers), shapes=[(l.out_features, l.in_features) for l in layers.values()],
                   **per_layer, rmax=np.asarray(rmax, dtype=np.int64), rdense=np.asarray(rdense, dtype=np.int64),
                   dense_sens=np.asarray(dense_sens, dtype=np.float64),
                   bias_bytes=np.asarray(bias_b, dtype=np.float64), float_bytes=int(fb), lams=lams, key=key,
                   meta={"calibrated": batches is not None, "seconds": round(time.perf_counter() - t0, 2),
                         "fisher_seconds": round(t_fisher, 2), "score_map": sm.method,
                         "calib_windows": 0 if batches is None else sum(b["input_ids"].shape[0] for b in batches)},
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


def _build(pm: ACIPModel, sm: ScoreMap, adapters: bool, a: Allocation, quant: Any, calib: Any) -> nn.Module:
    from dataclasses import replace

    from ..quant import quantize_
    from . import export

    new = export(pm, score_map=sm, adapters=adapters, _ranks=a.ranks)
    by_lam: dict[float, list[str]] = {}
    for name, lam in a.lam.items():
        if lam is not None:
            by_lam.setdefault(lam, []).append(name)
    if quant.rounding == "gptq" and by_lam:  # one calibration pass for every quantized linear, then layer by layer
        from ..quant.registry import calibration_grams, target_linears

        lins = list(target_linears(new, sorted(a_name for names in by_lam.values() for a_name in names)))
        for lin, gram in calibration_grams(new, calib, lins).items():
            layer = lin.rsplit(".", 1)[0] if lin.endswith((".up", ".down")) and lin not in a.lam else lin
            quantize_(new, replace(quant, lam=a.lam[layer], target_modules=[lin], gram=gram))
    else:
        for lam, names in sorted(by_lam.items()):
            quantize_(new, replace(quant, lam=lam, target_modules=names))
    if by_lam:
        new.config.acip_quant = {"allocation": "budget", "lams": {n: a.lam[n] for n in a.lam},
                                 **{k: v for k, v in quant.to_dict().items() if k in ("fmt", "rounding", "damp")}}
    return new


def _check_quant(quant: Any, calib: Any) -> Any:
    """``quant`` as the budget's quantizer settings: None -> ``EntropyQuantConfig()``; anything but an
    entropy quantizer config, a layer selection or an allocation of its own is refused."""
    from ..quant import EntropyQuantConfig
    from ..quant.registry import resolve_config

    q = EntropyQuantConfig() if quant is None else resolve_config(quant)
    if not isinstance(q, EntropyQuantConfig):
        raise TypeError(f"a byte budget stores its quantized layers with the entropy quantizer; quantize={quant!r} is "
                        f"a {type(q).__name__}. Pass an EntropyQuantConfig (e.g. EntropyQuantConfig(fmt='uniform')) "
                        f"or leave quantize= out")
    if q.allocation != "uniform" or q.target_modules is not None or q.exclude_modules is not None:
        raise ValueError("a byte budget chooses every layer's rank and lam itself: pass an EntropyQuantConfig without "
                         "allocation='sensitivity', target_modules or exclude_modules")
    if q.rounding == "gptq" and calib is None:
        raise ValueError("EntropyQuantConfig(rounding='gptq') in a byte budget needs calib= batches of training text "
                         "(they calibrate the Fisher cost model and the GPTQ Grams)")
    return q


def export_budget(source: Any, *, size_mb: float | None = None, bits_per_param: float | None = None,
                  model: Any = None, score_map: ScoreMap | None = None, adapters: bool | str = "auto",
                  calib: Any = None,
                  lams: tuple[float, ...] | None = None, cache: str | os.PathLike | None = None,
                  progress: Callable[[str], None] | None = None, quant: Any = None) -> nn.Module:
    """Build the least-damage export whose target layers store at most the budget (see module docstring).

    ``size_mb`` (10^6 bytes) or ``bits_per_param`` (over the target layers' dense parameters) sets the
    budget. ``calib``: token-id batches of training text for the Fisher sensitivities (else data-free). ``cache``:
    where the cost model is kept (default: ``budget_cost.safetensors`` in a run directory source).
    Per-layer choices, predicted and measured bytes are in ``model.config.acip_export["budget"]``.
    ``quant``: the entropy quantizer's settings for the quantized layers (an ``EntropyQuantConfig``;
    its ``lam`` is chosen per layer, so only ``fmt``, ``rounding``, ``damp`` and the fallback fields
    count; default ``EntropyQuantConfig()``). ``EntropyQuantConfig(fmt="uniform", rounding="gptq")``
    needs ``calib``: the same batches calibrate the Fisher and each quantized factor's GPTQ Gram.
    """
    from . import resolve

    if (size_mb is None) == (bits_per_param is None):
        raise TypeError("pass exactly one of size_mb= (10^6 bytes of the target layers) or bits_per_param=")
    for nm, v in (("size_mb", size_mb), ("bits_per_param", bits_per_param)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise ValueError(f"{nm} must be a positive number, got {v!r}")
    quant = _check_quant(quant, calib)
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
                    cache=cache, progress=progress, quant=quant)
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
        new = _build(pm, sm, adapters, a, quant, calib)
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
                       "sensitivity": float(cm.dense_sens[i])} for i, n in enumerate(cm.names)},
    }
    return new
