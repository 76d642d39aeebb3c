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
"""
from __future__ import annotations

from dataclasses import dataclass

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

    @classmethod
    def build(
        cls,
        names: list[str],
        scores: list[torch.Tensor],
        shapes: list[tuple[int, int]],
        biases: list[bool],
    ) -> "RankAllocator":
        """Sort once. ``shapes`` are ``(out, in)``; ``scores[l]`` has ``min(out, in)`` entries."""
        counts = torch.tensor([s.numel() for s in scores], dtype=torch.int64)
        flat = torch.cat([s.detach().float().flatten() for s in scores]) if scores else torch.zeros(0)
        if not torch.isfinite(flat).all():
            bad = [n for n, s in zip(names, scores) if not torch.isfinite(s).all()]
            raise ValueError(f"score map holds NaN/inf scores in layers {bad[:5]}")
        layer_id = torch.repeat_interleave(torch.arange(len(scores)), counts)
        # stable descending sort == order by (-score, layer, index): deterministic tie-break
        order = torch.sort(flat, descending=True, stable=True).indices
        lid = layer_id[order]
        # position j of each sorted entry inside its layer: stable sort by layer keeps global order
        by_layer = torch.sort(lid, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        j = torch.empty_like(lid)
        j[by_layer] = torch.arange(lid.numel()) - torch.repeat_interleave(starts, counts)
        outs = torch.tensor([o for o, _ in shapes], dtype=torch.int64)
        ins = torch.tensor([i for _, i in shapes], dtype=torch.int64)
        per_rank = (ins + outs)[lid]
        dense = (ins * outs)[lid]
        inc = torch.minimum((j + 1) * per_rank, dense) - torch.minimum(j * per_rank, dense)
        bias_cost = int(sum(o for (o, _), b in zip(shapes, biases) if b))
        cum = torch.cumsum(inc, 0) + bias_cost
        kmax = int(counts.max()) if len(counts) else 0
        big = torch.iinfo(torch.int64).max
        positions = torch.full((len(scores), kmax), big, dtype=torch.int64)
        gpos = by_layer  # global positions grouped by layer, ascending inside each layer
        for l, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
            positions[l, :c] = gpos[s : s + c]
        order_in_layer = [
            torch.sort(sc.detach().float().flatten(), descending=True, stable=True).indices
            for sc in scores
        ]
        dense_total = int((ins * outs).sum()) + bias_cost
        return cls(list(names), cum, bias_cost, dense_total, positions, order_in_layer)

    def prefix_length(self, ratio: float) -> int:
        """Largest ``n`` with ``C(n) <= ratio * C_dense``."""
        budget = torch.tensor([int(ratio * self.dense_cost + 1e-9)], dtype=torch.int64)
        return int(torch.searchsorted(self.cum_cost, budget, right=True)[0])

    def ranks(self, ratio: float) -> dict[str, int]:
        """Exact per-layer ranks of the longest prefix of the global order that fits ``ratio``."""
        n = self.prefix_length(ratio)
        q = torch.full((self.positions.shape[0], 1), n, dtype=torch.int64)
        r = torch.searchsorted(self.positions, q).squeeze(1)
        return dict(zip(self.names, r.tolist()))

    def cost_of(self, n: int) -> int:
        """``C(n)``, the target-layer parameters when the first ``n`` entries are kept."""
        return self.base_cost if n == 0 else int(self.cum_cost[n - 1])
