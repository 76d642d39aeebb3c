"""Low-rank layers of exported models, and the config-driven layout that rebuilds them on load.

An exported model is an ordinary ``transformers`` model whose config carries ``acip_layout``:
``{module_name: {"kind": ..., ...}}``. At ``import acip`` we wrap ``PreTrainedModel.post_init``
so that every model built from such a config (``from_pretrained``, ``from_config``, ``cls(config)``)
swaps those modules for empty modules of the right shapes *before* weights are loaded. The user
needs no custom code beyond ``import acip``; other packages (the quantizer) register more kinds.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "LAYOUT_KEY",
    "LowRankLinear",
    "register_module_kind",
    "apply_layout",
    "install_layout_hook",
]

LAYOUT_KEY = "acip_layout"


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


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters(recurse=False):
        return p.dtype
    return None


def _build_lowrank(entry: dict, old: nn.Module) -> nn.Module:
    return LowRankLinear(
        entry["in_features"], entry["out_features"], entry["rank"], entry["bias"],
        dtype=_dtype_of(old), device=getattr(old, "weight", torch.empty(0)).device,
    )


def _build_dense(entry: dict, old: nn.Module) -> nn.Module:
    return old  # the original architecture already has the dense layer


_BUILDERS: dict[str, Callable[[dict, nn.Module], nn.Module]] = {
    "lowrank": _build_lowrank,
    "dense": _build_dense,
}


def register_module_kind(kind: str, build: Callable[[dict, nn.Module], nn.Module]) -> None:
    """Teach the layout hook to build modules of ``kind``: ``build(entry, old_module) -> module``."""
    _BUILDERS[kind] = build


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> int:
    """Replace the modules named in ``layout`` (parents before children); return how many.

    Names that do not resolve inside ``model`` are skipped: ``post_init`` also runs on inner
    base models (e.g. ``LlamaModel`` inside ``LlamaForCausalLM``), where the names carry an
    extra prefix.
    """
    done = 0
    for name in sorted(layout, key=lambda n: (n.count("."), n)):
        entry = layout[name]
        kind = entry.get("kind")
        if kind not in _BUILDERS:
            raise ValueError(
                f"layer {name!r} has acip layout kind {kind!r}, which this acip does not know "
                f"(known: {sorted(_BUILDERS)}). Import the package that registers it "
                f"(e.g. `import acip.quant`) or upgrade acip."
            )
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError:
            continue
        if not isinstance(old, nn.Module):
            continue
        new = _BUILDERS[kind](entry, old)
        if new is not old:
            setattr(parent, child, new)
        done += 1
    return done


_HOOK_INSTALLED = False


def install_layout_hook() -> None:
    """Wrap ``transformers.PreTrainedModel.post_init`` so configs with ``acip_layout`` rebuild."""
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        layout = getattr(getattr(self, "config", None), LAYOUT_KEY, None)
        if layout:
            apply_layout(self, layout)
        return original(self, *args, **kwargs)

    post_init.__wrapped__ = original  # type: ignore[attr-defined]
    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]
    _HOOK_INSTALLED = True
