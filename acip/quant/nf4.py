"""bitsandbytes 4-bit NF4 hand-off (``acip.quant.apply(model, "nf4")``), in memory.

Each target ``nn.Linear`` becomes ``bnb.nn.Linear4bit(quant_type="nf4")`` with double
quantization (blocks of 64 weights share an absmax, itself 8-bit quantized in blocks of 256).
Stored bytes per layer = packed 4-bit weight + every tensor of ``quant_state.as_dict(packed=True)``
(absmax codes, second-level absmax, code books), the same "every stored byte" rule as ours.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["quantize_nf4_", "nf4_stored_bytes", "is_nf4"]


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            f"quantize='nf4' needs bitsandbytes (>= 0.45 has a CPU backend), which could not be imported ({e}). "
            f"Install it with `pip install 'bitsandbytes>=0.45'` (or `pip install -e '.[bench]'`), "
            f"or use quantize='entropy', which needs no extra package."
        ) from None
    return bnb


def is_nf4(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def nf4_stored_bytes(module: nn.Module) -> int:
    """Bytes of the packed weight and its quantization state (not counting the bias)."""
    w = module.weight
    total = int(w.numel() * w.element_size())
    for v in w.quant_state.as_dict(packed=True).values():
        if isinstance(v, torch.Tensor):
            total += int(v.numel() * v.element_size())
    return total


@torch.no_grad()
def quantize_nf4_(model: nn.Module, target_modules: Any = None) -> nn.Module:
    """Replace every target ``nn.Linear`` (default: all but the output embedding) by NF4 4-bit."""
    from .api import target_linears
    from .config import EntropyQuantConfig

    bnb = _bnb()
    cfg = EntropyQuantConfig(target_modules=target_modules)
    for name, lin in target_linears(model, cfg).items():
        if lin.in_features % 64:
            continue  # bitsandbytes' blocks of 64 need whole rows of blocks on CPU
        dev = lin.weight.device
        if dev.type != "cpu" and dev.type != "cuda":
            raise RuntimeError(f"{name}: bitsandbytes NF4 runs on cpu/cuda, the layer is on {dev}")
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True, device="cpu")
        q.weight = bnb.nn.Params4bit(lin.weight.data.float().cpu().clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.float().cpu().clone(), requires_grad=False)
        try:
            q = q.to(dev)
            if hasattr(q, "set_support_avx512bf16_for_cpu"):
                q.set_support_avx512bf16_for_cpu(False)
            elif hasattr(q, "support_avx512bf16_for_cpu"):
                q.support_avx512bf16_for_cpu = False
        except Exception as e:  # noqa: BLE001 - bitsandbytes raises many types
            raise RuntimeError(
                f"{name}: bitsandbytes could not quantize to NF4 on {dev} ({type(e).__name__}: {e}). "
                f"Its CPU backend needs bitsandbytes >= 0.45; use quantize='entropy' instead."
            ) from None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
    return model
