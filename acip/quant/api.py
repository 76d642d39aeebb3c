"""The quantizer hand-off: ``quantize_``, ``apply``, ``set_decode_mode`` and layer targeting."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from ..core.lowrank import LAYOUT_KEY
from .codec import encode_codes
from .config import EntropyQuantConfig
from .module import _PENDING, KIND, EntQuantLinear, LRUWeightCache, build_from_entry, decode_into, decode_pending
from .optimize import quantize_weight

__all__ = ["quantize_", "apply", "set_decode_mode", "target_linears", "quantized_layers", "decode_pending"]



def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def target_linears(model: nn.Module, cfg: EntropyQuantConfig) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` (including each factor of a low-rank layer) except the output
    embedding, filtered by ``cfg.target_modules`` / ``cfg.exclude_modules`` (names or suffixes)."""
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
    out: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is head:
            continue
        if cfg.target_modules is not None and not _matches(name, cfg.target_modules):
            continue
        if cfg.exclude_modules is not None and _matches(name, cfg.exclude_modules):
            continue
        out[name] = mod
    if cfg.target_modules is not None and not out:
        raise ValueError(f"target_modules={list(cfg.target_modules)} matched no nn.Linear of the model; "
                         f"names look like {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]}")
    return out


def quantized_layers(model: nn.Module) -> dict[str, EntQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, EntQuantLinear)}


@torch.no_grad()
def quantize_(model: nn.Module, cfg: Any = None, progress: Callable[[str], None] | None = None) -> nn.Module:
    """Quantize ``model`` in place (EntQuant style) and return it.

    Each target weight gets per-row power-of-two scales and 8-bit codes (``quantize_weight``),
    entropy coded with ANS (``encode_codes``); the layer becomes an :class:`EntQuantLinear` and
    ``model.config.acip_layout[name]`` records how to rebuild it, so ``save_pretrained`` /
    ``acip.load`` round-trip. ``progress`` (e.g. ``print``) receives one line per layer.
    """
    cfg = EntropyQuantConfig() if cfg is None else EntropyQuantConfig.from_any(cfg)
    config = getattr(model, "config", None)
    layout = None
    if config is not None:
        layout = dict(getattr(config, LAYOUT_KEY, None) or {})
    for name, lin in target_linears(model, cfg).items():
        t0 = time.perf_counter()
        res = quantize_weight(lin.weight, cfg, name)
        if res is None:  # fallback="keep"
            if progress:
                progress(f"{name}: kept dense")
            continue
        enc = encode_codes(res.codes, cfg.chunk_bytes, cfg.backend, name)
        new = EntQuantLinear.from_result(res, enc, lin.bias, name).to(lin.weight.device)
        new._weight = res.dequantize().to(lin.weight.device)  # the result is already decoded
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        if layout is not None:
            layout[name] = new.entry
        if progress:
            bits = 8.0 * sum(new.stored_bytes().values()) / lin.weight.numel()
            note = f" FALLBACK {res.method}: {res.reason}" if res.reason else ""
            progress(f"{name}: {bits:.2f} bits, H={res.entropy:.2f}, err={res.rel_error:.4f}, "
                     f"it={res.iterations}, {time.perf_counter() - t0:.1f}s{note}")
    if layout is not None:
        setattr(config, LAYOUT_KEY, layout)
        config.acip_quant = cfg.to_dict()
    return model


def apply(model: nn.Module, spec: Any) -> nn.Module:
    """``acip.export(..., quantize=spec)`` hand-off: ``EntropyQuantConfig``, dict, ``"entropy"``
    or ``"nf4"`` (bitsandbytes 4-bit NF4 on CPU)."""
    if isinstance(spec, str) and spec.lower() == "nf4":
        from .nf4 import quantize_nf4_

        return quantize_nf4_(model)
    if isinstance(spec, str) and spec.lower() not in ("entropy", "entquant"):
        raise ValueError(f"unknown quantize spec {spec!r}; use 'entropy', 'nf4', an EntropyQuantConfig or a dict of its fields")
    return quantize_(model, EntropyQuantConfig.from_any(spec))


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


def register_kinds() -> None:
    """Teach the layout hook (``acip.core.lowrank``) to rebuild quantized layers on load."""
    from acip.core.lowrank import register_module_kind

    from .nf4 import KIND_NF4, build_nf4_from_entry

    register_module_kind(KIND, build_from_entry)
    register_module_kind(KIND_NF4, build_nf4_from_entry)
