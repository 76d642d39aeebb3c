"""Size accounting measured from the tensors an exported model actually holds."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .layout import LAYOUT_KEY

__all__ = ["SizeReport", "size_report", "size_ratio", "check_ratio"]


def check_ratio(value: Any, name: str = "ratio", include_one: bool = True) -> float:
    """Validate a size ratio: a real number in ``(0, 1]`` (``(0, 1)`` when ``include_one=False``).

    Booleans, strings and NaN are refused (``ratio=True`` is not 1.0).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        try:
            num = float(value) if isinstance(value, str) and not isinstance(value, bool) else None
        except ValueError:
            num = None
        hint = f" (did you mean {name}={num}?)" if num is not None and math.isfinite(num) else ""
        raise ValueError(f"{name} must be a number in (0, 1{']' if include_one else ')'}, got {value!r}{hint}; "
                         f"e.g. {name}=0.4 keeps 40% of the target layers' parameters")
    r = float(value)
    if not (0.0 < r < 1.0 or (include_one and r == 1.0)):
        raise ValueError(
            f"{name} must be in (0, 1{']' if include_one else ')'} (the fraction of target-layer parameters to "
            f"keep), got {value!r}; e.g. {name}=0.4 keeps 40%"
        )
    return r


@dataclass(frozen=True)
class SizeReport:
    """Parameter counts of an exported model.

    ``target_ratio = target_params / target_dense_params`` over the compressed layers;
    ``full_ratio`` adds every other unique parameter (embeddings, norms, head) to both sides.
    """

    target_params: int
    target_dense_params: int
    total_params: int
    total_dense_params: int

    @property
    def target_ratio(self) -> float:
        return self.target_params / self.target_dense_params

    @property
    def full_ratio(self) -> float:
        return self.total_params / self.total_dense_params

    def __str__(self) -> str:
        return (
            f"target layers: {self.target_params:,} / {self.target_dense_params:,} params "
            f"(ratio {self.target_ratio:.4f}); whole model: {self.total_params:,} / "
            f"{self.total_dense_params:,} (ratio {self.full_ratio:.4f})"
        )


def _stored_params(module: nn.Module) -> int:
    """Parameters a module stands for. A quantized layer (duck-typed by ``n_params``, e.g.
    ``acip.quant.EntQuantLinear``) keeps its weight as coded buffers; it counts its dense weight
    elements, so ratios stay parameter ratios (bytes are ``acip.quant.report``'s job)."""
    n = 0
    for m in module.modules():
        if hasattr(m, "n_params") and not isinstance(m, nn.Linear):
            n += int(m.n_params)
        else:
            n += sum(p.numel() for p in m.parameters(recurse=False))
    return n


def size_report(model: nn.Module) -> SizeReport:
    """Count the parameters of an exported model's target layers, from the tensors that exist.

    The dense reference of each layer (``in*out`` + bias) comes from the layout in the config.
    """
    layout = getattr(getattr(model, "config", None), LAYOUT_KEY, None)
    if not layout:
        raise ValueError(
            f"{type(model).__name__} carries no acip layout in its config: it is not an acip export. "
            f"Export one with acip.export(score_map, ratio=...)."
        )
    top = {n: e for n, e in layout.items() if e.get("kind") in ("lowrank", "dense")}
    target = sum(_stored_params(model.get_submodule(n)) for n in top)
    dense = sum(e["in_features"] * e["out_features"] + (e["out_features"] if e["bias"] else 0) for e in top.values())
    prefixes = tuple(n + "." for n in top)
    rest = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(prefixes))
    rest += sum(  # quantized layers outside the targets: dense weight elements (bias already counted)
        int(m.n_params) - sum(p.numel() for p in m.parameters(recurse=False))
        for n, m in model.named_modules()
        if hasattr(m, "n_params") and not isinstance(m, nn.Linear) and not (n + ".").startswith(prefixes)
    )
    return SizeReport(target, dense, target + rest, dense + rest)


def size_ratio(model: nn.Module, full: bool = False) -> float:
    """Measured size ratio of an exported model (target layers, or the whole model)."""
    rep = size_report(model)
    return rep.full_ratio if full else rep.target_ratio
