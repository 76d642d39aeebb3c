"""``EntQuantLinear``: a linear layer whose weight is stored as entropy-coded 8-bit codes.

Persistent buffers (written by ``save_pretrained`` into safetensors, read by ``from_pretrained``):
``codes_stream`` (uint8 payload), ``codes_table`` (uint8 packed frequencies) and ``scales``
(int8 exponents ``t`` for ``method="entquant"``: ``W = value[code] * 2**t``; int8 exponents for
``method="ecsq"`` (``fmt="uniform"``): ``W = code * 2**((t + step_offset) / 16)``, ``step_offset`` in
the layout entry and inside ``scales_sha256``; fp32 absmax scales, stored bit-for-bit as int32,
for ``method="absmax8"``), plus the fp32 ``bias``. Shapes, codec meta and the sha256 live in the
model config's ``acip_layout`` entry, so a corrupted or truncated file fails its checksum.

Decode modes: ``"eager"`` decodes once (on first use) and keeps the fp32 weight; ``"lazy"`` keeps
only the streams and decodes just before each forward through a small per-model LRU cache.
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.io import ChecksumError, tensor_digest
from ..core.layout import register_module_kind
from .codec import EncodedTensor, decode_many
from .optimize import METHODS, QuantResult, dequantize

__all__ = ["EntQuantLinear", "LRUWeightCache", "layout_entry", "build_from_entry", "decode_pending", "decode_weights",
           "scales_digest"]

KIND = "entquant"
_PENDING: "weakref.WeakSet[EntQuantLinear]" = weakref.WeakSet()  # loaded, eager, not decoded yet


def decode_pending() -> int:
    """Decode every loaded eager-mode layer that has no weight yet, in one batched codec call
    (the rANS decoder runs all their streams in lockstep). Returns how many were decoded."""
    return decode_into([m for m in list(_PENDING) if m.mode == "eager" and m._weight is None
                        and m.codes_stream.device.type != "meta"])


def decode_weights(layers: "list[EntQuantLinear]") -> list[torch.Tensor]:
    """fp32 weights of ``layers`` from one batched codec call (all rANS streams in lockstep)."""
    codes = decode_many([m.encoded() for m in layers])
    return [m.dequantize_codes(c) for m, c in zip(layers, codes)]


def decode_into(layers: "list[EntQuantLinear]") -> int:
    """Decode ``layers`` in one batched codec call and keep their fp32 weights."""
    if not layers:
        return 0
    for m, w in zip(layers, decode_weights(layers)):
        m._weight = w
        _PENDING.discard(m)
    return len(layers)


class LRUWeightCache:
    """Keeps the decoded weights of the ``size`` most recently used layers.

    On a miss the layer is decoded together with the next ``size - 1`` uncached layers in
    model order (``set_order``), in one lockstep rANS pass: a pass costs about as much for one
    tensor as for several (its step count is the stream length, not the tensor size), so a
    forward pass runs ``~layers / size`` passes instead of one per layer. ``decodes`` counts
    decoded layers, ``passes`` codec calls.
    """

    def __init__(self, size: int = 2) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"cache size must be an int >= 0, got {size!r}")
        self.size = size
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._order: list[EntQuantLinear] = []
        self._pos: dict[int, int] = {}
        self.decodes = 0
        self.passes = 0

    def set_order(self, layers: "list[EntQuantLinear]") -> None:
        """The order in which the forward pass uses the layers (module order)."""
        self._order = list(layers)
        self._pos = {id(m): i for i, m in enumerate(self._order)}

    def get(self, layer: "EntQuantLinear") -> torch.Tensor:
        key = id(layer)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        batch = [layer]
        if self.size > 1 and key in self._pos:
            for nxt in self._order[self._pos[key] + 1:]:
                if len(batch) >= self.size:
                    break
                if id(nxt) not in self._items:
                    batch.append(nxt)
        weights = decode_weights(batch)
        self.decodes += len(batch)
        self.passes += 1
        if self.size > 0:
            for m, w in zip(batch, weights):
                self._items[id(m)] = w
                self._items.move_to_end(id(m))
            self._items.move_to_end(key)  # the layer in use now is the most recent
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return weights[0]

    def __len__(self) -> int:
        return len(self._items)


class EntQuantLinear(nn.Module):
    """``y = x What^T + b`` with ``What`` decoded from ``codes_stream`` (see module docstring)."""

    def __init__(self, entry: dict[str, Any], device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(entry["in_features"]), int(entry["out_features"])
        self.method, self.fmt = str(entry["method"]), str(entry["fmt"])
        self.name = str(entry.get("name", "weight"))
        if self.method not in METHODS:
            raise ValueError(f"layer {self.name!r}: acip_layout names the quantization method {self.method!r}, which "
                             f"this acip does not know (it knows {list(METHODS)}); the file was written by a newer "
                             f"acip or edited: upgrade acip, or re-save the model")
        self.step_offset = 0
        if self.method == "ecsq":
            off = entry.get("step_offset")
            if isinstance(off, bool) or not isinstance(off, int):
                raise ValueError(f"layer {self.name!r}: an 'ecsq' acip_layout entry needs an integer 'step_offset', "
                                 f"got {off!r}; the file is corrupted or edited: re-save the model")
            self.step_offset = off
        self.entry = dict(entry)
        scale_dtype = torch.int32 if self.method == "absmax8" else torch.int8  # absmax8: fp32 bits
        self.register_buffer("codes_stream", torch.empty(int(entry["stream_bytes"]), dtype=torch.uint8, device=device))
        self.register_buffer("codes_table", torch.empty(int(entry["table_bytes"]), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(self.out_features, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device)) if entry["bias"] else None
        self.mode = "eager"
        self.cache: LRUWeightCache | None = None
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_result(cls, res: QuantResult, enc: EncodedTensor, bias: torch.Tensor | None, name: str) -> "EntQuantLinear":
        entry = layout_entry(res, enc, bias is not None, name)
        m = cls(entry)
        m.codes_stream = enc.stream.clone()
        m.codes_table = enc.table.clone()
        m.scales = res.scales.clone()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=bias.requires_grad)
        return m

    def encoded(self) -> EncodedTensor:
        e = self.entry
        return EncodedTensor(self.codes_stream.cpu(), self.codes_table.cpu(), e["codec"],
                             (self.out_features, self.in_features), e["sha256"], self.name)

    def decode(self) -> torch.Tensor:
        """Decode and dequantize the weight to fp32 (verifies the checksum)."""
        return self.dequantize_codes(decode_many([self.encoded()])[0])

    def dequantize_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``value[codes] * scale_row`` after checking the scales against their sha256."""
        want = self.entry.get("scales_sha256")
        if want is not None and scales_digest(self.scales, self.method, self.step_offset) != want:
            tensor = self.name + ".scales"
            raise ChecksumError(f"tensor {tensor!r}: sha256 mismatch: the checkpoint is corrupted; "
                                f"re-save it from the original model", tensor=tensor)
        return dequantize(codes.to(self.scales.device), self.scales, self.method, self.fmt, self.step_offset)

    def stored_bytes(self) -> dict[str, int]:
        """Bytes this layer stores for its weight: payload, tables (+ sha256), scales."""
        return {
            "stream": int(self.codes_stream.numel()),
            "tables": int(self.codes_table.numel()) + 32,
            "scales": int(self.scales.numel() * self.scales.element_size()),
        }

    @property
    def n_params(self) -> int:
        """Parameters this layer represents (``out * in`` + bias), as for the dense layer."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight (decoded on demand in lazy mode)."""
        if self.mode == "eager":
            if self._weight is None:
                decode_pending()  # this layer and its freshly loaded siblings, in one batch
            if self._weight is None:
                self._weight = self.decode()
            return self._weight
        return self.cache.get(self) if self.cache is not None else self.decode()

    def set_mode(self, mode: str, cache: LRUWeightCache | None = None) -> None:
        self.mode, self.cache = mode, cache
        if mode == "lazy":
            self._weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        b = self.bias
        if w.dtype != x.dtype or w.device != x.device:
            w = w.to(device=x.device, dtype=x.dtype)
            b = None if b is None else b.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)

    def _apply(self, fn: Any, recurse: bool = True) -> "EntQuantLinear":  # keep the cache on the right device
        super()._apply(fn, recurse)
        if self._weight is not None:
            self._weight = fn(self._weight) if self._weight.is_floating_point() else self._weight
        return self

    def describe(self) -> str:
        """One progress line: bits/param (every stored byte), code entropy, error, iterations."""
        bits = 8.0 * sum(self.stored_bytes().values()) / max(1, self.in_features * self.out_features)
        st = self.entry.get("stats", {})
        note = f" FALLBACK {self.method}: {st['reason']}" if st.get("reason") else ""
        return (f"{bits:.2f} bits, H={st.get('entropy', float('nan')):.2f}, err={st.get('rel_error', float('nan')):.4f}, "
                f"it={st.get('iterations', 0)}{note}")

    def extra_repr(self) -> str:
        bits = 8.0 * sum(self.stored_bytes().values()) / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
                f"fmt={self.fmt}, bits={bits:.2f}, mode={self.mode}")


def scales_digest(scales: torch.Tensor, method: str, step_offset: int = 0) -> str:
    """sha256 of the stored scales; for ``"ecsq"`` it also covers the tensor's ``step_offset``
    (``sha256("<tensor digest>:<offset>")``), so an edited offset fails the check like a flipped byte."""
    d = tensor_digest(scales)
    if method != "ecsq":
        return d
    return hashlib.sha256(f"{d}:{int(step_offset)}".encode()).hexdigest()


def layout_entry(res: QuantResult, enc: EncodedTensor, bias: bool, name: str) -> dict[str, Any]:
    """The ``acip_layout`` entry: everything needed to build the empty module and check it."""
    out, inn = enc.shape
    extra = {"step_offset": int(res.step_offset)} if res.method == "ecsq" else {}
    return {
        "kind": KIND,
        "name": name,
        "method": res.method,
        "fmt": res.fmt,
        "in_features": int(inn),
        "out_features": int(out),
        "bias": bool(bias),
        "stream_bytes": int(enc.stream.numel()),
        "table_bytes": int(enc.table.numel()),
        "codec": enc.meta,
        "sha256": enc.sha256,
        "scales_sha256": scales_digest(res.scales, res.method, res.step_offset),
        **extra,
        "stats": {
            "entropy": round(res.entropy, 6),
            "unique": res.unique,
            "rel_error": round(res.rel_error, 6),
            "iterations": res.iterations,
            "retries": res.retries,
            "reason": res.reason,
        },
    }


def build_from_entry(entry: dict[str, Any], old: nn.Module) -> nn.Module:
    """Layout hook builder: an empty ``EntQuantLinear`` with the buffer shapes of ``entry``."""
    dev = None
    for t in list(old.parameters(recurse=False)) + list(old.buffers(recurse=False)):
        dev = t.device
        break
    m = EntQuantLinear(entry, device=dev)
    _PENDING.add(m)
    return m


register_module_kind(KIND, build_from_entry)
