"""The entropy quantizer's handler (``EntropyQuantConfig`` / ``"entropy"``) and the decode modes.

``quantize_`` itself (the one verb, shared by every quantizer) lives in :mod:`acip.quant.registry`.
"""
from __future__ import annotations

from torch import nn

from .codec import encode_codes
from .config import EntropyQuantConfig
from .module import _PENDING, EntQuantLinear, LRUWeightCache, decode_into, decode_pending
from .optimize import quantize_weight
from .registry import register_quantizer

__all__ = ["set_decode_mode", "quantized_layers", "decode_pending"]


@register_quantizer(EntropyQuantConfig, "entropy", "entquant")
def _entropy_linear(lin: nn.Linear, cfg: EntropyQuantConfig, name: str) -> EntQuantLinear | None:
    """One ``nn.Linear`` -> :class:`EntQuantLinear`: per-row power-of-two scales and 8-bit codes
    (``quantize_weight``), entropy coded with ANS (``encode_codes``); None when ``fallback="keep"``."""
    res = quantize_weight(lin.weight, cfg, name)
    if res is None:
        return None
    enc = encode_codes(res.codes, cfg.chunk_bytes, cfg.backend, name)
    new = EntQuantLinear.from_result(res, enc, lin.bias, name).to(lin.weight.device)
    new._weight = res.dequantize().to(lin.weight.device)  # the result is already decoded
    return new


def quantized_layers(model: nn.Module) -> dict[str, EntQuantLinear]:
    """``{dotted name: EntQuantLinear}`` of ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, EntQuantLinear)}


def set_decode_mode(model: nn.Module, mode: str = "eager", cache_layers: int = 2) -> nn.Module:
    """``"eager"``: decode every quantized layer now (one batched call) and keep fp32 weights.
    ``"lazy"``: keep only the coded streams; decode a layer just before its forward, keeping the
    ``cache_layers`` most recently used weights (an LRU cache shared by the model's layers).
    A miss decodes that layer and the next ``cache_layers - 1`` in one lockstep pass, so a
    larger cache also means fewer, cheaper-per-layer decode passes (see ``LRUWeightCache``)."""
    if mode not in ("eager", "lazy"):
        raise ValueError(f"decode mode must be 'eager' or 'lazy', got {mode!r}")
    if isinstance(cache_layers, bool) or not isinstance(cache_layers, int) or cache_layers < 0:
        raise ValueError(f"cache_layers must be an int >= 0, got {cache_layers!r}")
    layers = list(quantized_layers(model).values())
    if mode == "lazy":
        cache = LRUWeightCache(cache_layers)
        cache.set_order(layers)
        for m in layers:
            m.set_mode("lazy", cache)
            _PENDING.discard(m)
        return model
    for m in layers:
        m.set_mode("eager")
    decode_into([m for m in layers if m._weight is None])
    return model
