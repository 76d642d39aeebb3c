"""Exact global rank allocation from per-layer scores.

Every singular direction ``(l, j)`` of every layer has a score; a higher score means "keep longer".
One stable sort of all scores (descending; ties broken by layer order, then by index inside the
layer) gives the global order. Keeping the first ``n`` entries of that order keeps, in layer ``l``,
its ``r_l(n)`` best-scored directions, at total cost

    C(n) = sum_l cost_l(r_l(n)),   cost_l(r) = min(r * (in_l + out_l), in_l * out_l) + bias_l.

``cost_l`` is monotone in ``r``, so ``C`` is monotone in ``n``: the entry at global position ``p``
adds ``cost_l(j+1) - cost_l(j) >= 0`` where ``j`` is its position inside its layer. The cumulative
sum of these increments is computed once; the largest ``n`` with ``C(n) <= rho * C_dense`` is then
one binary search, and the per-layer ranks one batched binary search over each layer's sorted
global positions. This is exact: no other prefix of the order fits more entries.

Dense lift: a layer whose prefix rank ``r`` passes its break-even point (``r * (in + out) > in * out``)
is stored as a dense matrix, which costs ``in * out`` whatever its rank. Its remaining directions
are then free, so :meth:`RankAllocator.ranks` returns the full rank ``k`` for it: the stored
matrix is the whole (adapted) ``W`` instead of a rank-``r`` truncation of it, at the same cost.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RankAllocator"]


@dataclass
class RankAllocator:
    """Precomputed global order; ``ranks(ratio)`` is O(log N + L log k) per query."""

    names: list[str]
    cum_cost: torch.Tensor  # (N,) int64: C(n) for n = 1..N, bias included
    base_cost: int  # C(0): biases only
    dense_cost: int  # sum of in*out (+ bias)
    positions: torch.Tensor  # (L, kmax) int64: global positions of each layer's entries, padded
    order_in_layer: list[torch.Tensor]  # per layer: indices sorted by descending score
    full_rank: torch.Tensor  # (L,) int64: k_l = min(in_l, out_l)
    dense_from: torch.Tensor  # (L,) int64: smallest r with r * (in_l + out_l) > in_l * out_l

    @classmethod
    def build(
        cls,
        names: list[str],
        scores: list[torch.Tensor],
        shapes: list[tuple[int, int]],
        biases: list[bool],
    ) -> "RankAllocator":
        """Sort once. ``shapes`` are ``(out, in)``; ``scores[l]`` has ``min(out, in)`` entries.

        One integer key sort replaces a stable float sort: key = (order-preserving int of -score)
        << b | flat index is unique, so an unstable sort is deterministic and breaks ties by
        (layer, index). Grouping the sorted entries by layer is a radix sort of the layer ids.
        """
        counts = np.array([s.numel() for s in scores], dtype=np.int64)
        n_layers, total = len(scores), int(counts.sum())
        flat = np.concatenate([s.detach().float().cpu().numpy().ravel() for s in scores])
        if not np.isfinite(flat).all():
            bad = [n for n, s in zip(names, scores) if not torch.isfinite(s).all()]
            raise ValueError(f"score map holds NaN/inf scores in layers {bad[:5]}")
        shift = max(1, int(total - 1).bit_length())
        low = (1 << shift) - 1
        idx = np.arange(total, dtype=np.int64)
        bits = (flat + 0.0).view(np.int32).astype(np.int64)  # + 0.0 folds -0.0 into +0.0
        mono = np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # same order as the floats
        order = np.sort(((np.int64(1 << 31) - mono) << shift) | idx) & low  # descending score
        layer_id = np.repeat(np.arange(n_layers, dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        lid = layer_id[order]
        if n_layers < 2**15:  # numpy's stable sort of int16 is a radix sort: O(N)
            by_layer = np.argsort(lid.astype(np.int16), kind="stable")  # positions grouped by layer
        else:
            by_layer = np.sort((lid << shift) | idx) & low
        j = np.empty(total, dtype=np.int64)  # position of each sorted entry inside its layer
        j[by_layer] = idx - np.repeat(starts, counts)
        outs = np.array([o for o, _ in shapes], dtype=np.int64)
        ins = np.array([i for _, i in shapes], dtype=np.int64)
        per_rank, dense = (ins + outs)[lid], (ins * outs)[lid]
        inc = np.minimum((j + 1) * per_rank, dense) - np.minimum(j * per_rank, dense)
        bias_cost = int(sum(o for (o, _), b in zip(shapes, biases) if b))
        cum = np.cumsum(inc) + bias_cost
        kmax = int(counts.max()) if n_layers else 0
        positions = np.full((n_layers, kmax), np.iinfo(np.int64).max, dtype=np.int64)
        positions[lid, j] = idx
        order_tab = np.zeros((n_layers, kmax), dtype=np.int64)
        order_tab[lid, j] = order - starts[lid]
        order_in_layer = [torch.from_numpy(order_tab[l, :c]) for l, c in enumerate(counts.tolist())]
        dense_total = int((ins * outs).sum()) + bias_cost
        dense_from = (ins * outs) // (ins + outs) + 1
        return cls(list(names), torch.from_numpy(cum), bias_cost, dense_total,
                   torch.from_numpy(positions), order_in_layer, torch.from_numpy(counts),
                   torch.from_numpy(dense_from))

    def prefix_length(self, ratio: float) -> int:
        """Largest ``n`` with ``C(n) <= ratio * C_dense``."""
        budget = torch.tensor([int(ratio * self.dense_cost + 1e-9)], dtype=torch.int64)
        return int(torch.searchsorted(self.cum_cost, budget, right=True)[0])

    def prefix_ranks(self, ratio: float) -> dict[str, int]:
        """Per-layer ranks of the longest prefix of the global order that fits ``ratio``."""
        return dict(zip(self.names, self._prefix_ranks(ratio).tolist()))

    def _prefix_ranks(self, ratio: float) -> torch.Tensor:
        n = self.prefix_length(ratio)
        q = torch.full((self.positions.shape[0], 1), n, dtype=torch.int64)
        return torch.searchsorted(self.positions, q).squeeze(1)

    def ranks(self, ratio: float, lift: bool | Collection[str] = True) -> dict[str, int]:
        """Exact per-layer ranks at ``ratio``: the prefix ranks, dense-stored layers lifted to k.

        ``lift`` names the layers that may be lifted (``True``: all, ``False``: none). Lifting costs
        nothing (a dense layer costs ``in * out`` at any rank) and restores the exact original
        ``W`` of an untuned layer. A layer whose LoRA adapter was trained with its low-score
        directions pruned should not be lifted: the adapter already compensates for them.
        """
        r = self._prefix_ranks(ratio)
        if lift is True:
            may = torch.ones(len(self.names), dtype=torch.bool)
        else:
            names = set(lift or ())
            may = torch.tensor([n in names for n in self.names], dtype=torch.bool)
        r = torch.where(may & (r >= self.dense_from), self.full_rank, r)
        return dict(zip(self.names, r.tolist()))

    def cost_of(self, n: int) -> int:
        """``C(n)``, the target-layer parameters when the first ``n`` entries are kept."""
        return self.base_cost if n == 0 else int(self.cum_cost[n - 1])
