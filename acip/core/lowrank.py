"""The low-rank layer of exported models: ``y = up(down(x))``.

How an exported model rebuilds these layers on load is :mod:`acip.core.layout`'s job.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["LowRankLinear"]


class LowRankLinear(nn.Module):
    """``y = up(down(x))`` with ``down: in -> r`` (no bias) and ``up: r -> out`` (bias of the layer).

    Stores ``r * (in + out)`` (+ out) parameters instead of ``in * out``. ``r = 0`` is allowed: the
    layer then returns its bias (or zeros).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` product ``up.weight @ down.weight`` (for inspection only)."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            shape = (*x.shape[:-1], self.out_features)
            y = x.new_zeros(shape)
            return y if self.up.bias is None else y + self.up.bias
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
