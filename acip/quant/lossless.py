"""Lossless mode (DFloat11 style): ``quantize_(model, LosslessConfig())`` or ``"lossless"``; bit-exact weights.

A float weight is ``sign | exponent | mantissa``. In trained weights the exponent carries far
fewer bits of information than it occupies (about 2.6-3 of bf16's 8), while sign and mantissa
are close to uniform. So each weight is split into

* its exponent, ``E`` bits as one uint8 symbol, ANS-coded against the tensor's own histogram with
  the project's codec (:func:`acip.quant.codec.encode_codes`, the interleaved rANS with the torch
  decoder by default; its payload, packed frequency table and sha256 are the codec's), and
* its sign and mantissa, ``R = 1 + mantissa bits``, stored raw in the ``raw`` buffer: first
  ``R // 8`` byte planes (byte ``j`` of ``sign << mant_bits | mantissa`` for every weight), then
  the ``R % 8`` high bits as bit planes packed 8 weights per byte (little bit order).

=========  ==========  ============  ==================  ===========================
dtype      exponent    raw bits R    raw layout          bits/weight (typical)
=========  ==========  ============  ==================  ===========================
bfloat16   8 (14..7)   8             1 byte plane        8 + H(exp) ~ 10.6-11
float16    5 (14..10)  11            1 plane + 3 bits    11 + H(exp) ~ 13.5-14
float32    8 (30..23)  24            3 byte planes       24 + H(exp) ~ 26.6-27
=========  ==========  ============  ==================  ===========================

float32 weights are supported the same way (no cast needed, e.g. for an fp32 export); other
dtypes (float64, float8) are refused with a ``TypeError`` naming the dtype and the fix (cast the
model to bfloat16 or float16 first, ``model.to(torch.bfloat16)``).

The layer becomes :class:`LosslessLinear`: persistent buffers ``exp_stream`` (codec payload),
``exp_table`` (packed frequencies) and ``raw`` (uint8 planes), plus the bias in the weight's
dtype. Shapes, dtype, codec meta and the sha256 of the stream (the codec's) and of ``raw``
(:func:`acip.core.io.tensor_digest`) go to the model config's ``acip_layout`` (kind
``"lossless"``), so ``save_pretrained`` + ``acip.load`` rebuild it and a corrupted tensor raises
:class:`~acip.core.io.ChecksumError` naming it. Decoding is eager, on first use: every freshly
loaded layer is decoded together in one lockstep rANS call (:func:`decode_pending_lossless`) and
the exact original weight is kept. ``acip.quant.report`` counts stream + table (+ its 32-byte
sha256, as for the entropy quantizer) + raw planes, i.e. exactly what the files store.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.io import ChecksumError, tensor_digest
from ..core.layout import register_module_kind
from .codec import SHA_BYTES, EncodedTensor, decode_many, encode_codes
from .config import BACKENDS, _targets, _to_dict
from .registry import register_quantizer

__all__ = ["LosslessConfig", "LosslessLinear", "FLOAT_LAYOUTS", "split_float", "join_float", "decode_pending_lossless",
           "KIND_LOSSLESS"]

KIND_LOSSLESS = "lossless"

# dtype name -> (total bits, exponent bits, mantissa bits)
FLOAT_LAYOUTS: dict[str, tuple[int, int, int]] = {
    "bfloat16": (16, 8, 7),
    "float16": (16, 5, 10),
    "float32": (32, 8, 23),
}
_INT_VIEW = {16: torch.int16, 32: torch.int32}
_PENDING: "weakref.WeakSet[LosslessLinear]" = weakref.WeakSet()  # loaded, not decoded yet


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _layout_of(dtype: torch.dtype, name: str) -> tuple[int, int, int]:
    spec = FLOAT_LAYOUTS.get(_dtype_name(dtype))
    if spec is None:
        raise TypeError(f"{name}: lossless mode codes bfloat16, float16 and float32 weights, got {dtype}. "
                        f"Cast the model first (model.to(torch.bfloat16), or load it with dtype=torch.bfloat16), "
                        f"or leave the layer out with exclude_modules=[{name!r}]")
    return spec


@dataclass
class LosslessConfig:
    """Bit-exact compression of every target ``nn.Linear`` (DFloat11 style, see :mod:`acip.quant.lossless`).

    Each weight's exponent is ANS-coded against the tensor's histogram; sign and mantissa are
    stored raw. bfloat16 weights take about 11 bits, float16 about 14, float32 about 27; the
    decoded weight equals the original bit for bit. Other dtypes are refused (cast to bf16 first).

    Fields:
        target_modules: as in :class:`~acip.quant.EntropyQuantConfig` (None/"all-linear" = every
            ``nn.Linear`` except the output embedding; a regex string matching whole dotted names;
            a list of names/suffixes). A selected ``LowRankLinear`` stands for its two factors.
        exclude_modules: never coded; a regex string or a list of names/suffixes, as above.
        chunk_bytes: maximum exponents per independently decodable rANS stream/chunk (>= 1024);
            the torch backend caps streams at 4096 symbols anyway (the codec's default).
        backend: ANS codec: "auto" (= "torch"), "torch" or "constriction" (needs that package).
    """

    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    chunk_bytes: int = 262144
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.target_modules = _targets("LosslessConfig", "target_modules", self.target_modules)
        self.exclude_modules = _targets("LosslessConfig", "exclude_modules", self.exclude_modules)
        c = self.chunk_bytes
        if isinstance(c, bool) or not isinstance(c, (int, str, float)) or (isinstance(c, float) and not c.is_integer()):
            raise TypeError(f"LosslessConfig.chunk_bytes must be an integer, got {c!r}; use e.g. chunk_bytes=262144")
        try:
            self.chunk_bytes = int(c)
        except ValueError:
            raise TypeError(f"LosslessConfig.chunk_bytes must be an integer, got {c!r}; use e.g. chunk_bytes=262144") from None
        if self.chunk_bytes < 1024:
            raise ValueError(f"LosslessConfig.chunk_bytes must be >= 1024, got {c!r}; use e.g. chunk_bytes=262144")
        if not isinstance(self.backend, str) or self.backend.lower() not in BACKENDS:
            raise ValueError(f"LosslessConfig.backend={self.backend!r} is not supported; expected one of "
                             f"{list(BACKENDS)}. Use 'auto' unless you are comparing codecs.")
        self.backend = self.backend.lower()

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def _raw_bytes(n: int, raw_bits: int) -> int:
    return (raw_bits // 8) * n + (raw_bits % 8) * ((n + 7) // 8)


def split_float(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(exponents uint8 of w's shape, raw uint8 planes)`` of a bf16/fp16/fp32 tensor (see module docstring)."""
    total, _e_bits, m_bits = _layout_of(w.dtype, name)
    b = w.detach().cpu().contiguous().reshape(-1).view(torch.uint8).reshape(-1, total // 8)
    cols = [b[:, j] for j in range(total // 8)]  # bytes of the word, low first
    if sys.byteorder == "big":
        cols = cols[::-1]
    hi = cols[-1]
    if (1 + m_bits) % 8:  # float16: exponent = bits 14..10; mantissa 8, 9 and the sign go to packed bit planes
        exp = (hi >> 2) & 0x1F
        top = ((hi >> 5) & 4) | (hi & 3)
        parts = [cols[0].contiguous()]
        for k in range(3):
            parts.append(torch.from_numpy(np.packbits(((top >> k) & 1).numpy(), bitorder="little")))
    else:  # bfloat16 / float32: exponent = the top byte's low 7 bits and the next byte's bit 7
        nxt = cols[-2]
        exp = (hi << 1) | (nxt >> 7)
        parts = [c.contiguous() for c in cols[:-2]] + [(hi & 0x80) | (nxt & 0x7F)]
    exp = exp.reshape(w.shape)
    raw = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    return exp, raw


def join_float(exp: torch.Tensor, raw: torch.Tensor, dtype: torch.dtype, name: str = "weight") -> torch.Tensor:
    """The exact tensor of ``dtype`` (``exp``'s shape) that :func:`split_float` split; runs on ``raw``'s device."""
    total, e_bits, m_bits = _layout_of(dtype, name)
    n, r_bits = exp.numel(), 1 + m_bits
    if raw.numel() != _raw_bytes(n, r_bits):
        raise ValueError(f"{name}: raw planes hold {raw.numel()} bytes, {n} {dtype} weights need {_raw_bytes(n, r_bits)}")
    e = exp.reshape(-1).to(device=raw.device, dtype=torch.uint8)
    rest = [raw[j * n:(j + 1) * n] for j in range(r_bits // 8)]  # bytes of sign | mantissa, low first
    if r_bits % 8:  # float16: the 3 high bits (mantissa 8, 9 and the sign) come from packed bit planes
        off, nb = (r_bits // 8) * n, (n + 7) // 8
        shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)
        top = torch.zeros(n, dtype=torch.uint8, device=raw.device)
        for k in range(r_bits % 8):
            top |= (((raw[off + k * nb: off + (k + 1) * nb][:, None] >> shifts) & 1).reshape(-1)[:n]) << k
        words = [rest[0], ((top & 4) << 5) | (e << 2) | (top & 3)]
    else:  # bfloat16 / float32: the last rest byte holds the sign (bit 7) and the top 7 mantissa bits
        last = rest[-1]
        words = rest[:-1] + [(e << 7) | (last & 0x7F), (last & 0x80) | (e >> 1)]
    if sys.byteorder == "big":
        words = words[::-1]
    return torch.stack(words, dim=-1).view(_INT_VIEW[total]).view(dtype).reshape(exp.shape)


def _entropy(codes: torch.Tensor) -> tuple[float, int]:
    hist = torch.bincount(codes.reshape(-1).to(torch.int64), minlength=256).double()
    p = hist[hist > 0] / max(1.0, float(hist.sum()))
    return float(-(p * p.log2()).sum()), int((hist > 0).sum())


def decode_pending_lossless() -> int:
    """Decode every loaded :class:`LosslessLinear` without a weight yet in one batched rANS call."""
    layers = [m for m in list(_PENDING) if m._weight is None and m.exp_stream.device.type != "meta"]
    weights = decode_lossless(layers) if layers else []
    _PENDING.difference_update(layers)
    for m, w in zip(layers, weights):
        m._weight = w
    return len(layers)


def decode_lossless(layers: "list[LosslessLinear]") -> list[torch.Tensor]:
    """The exact weights of ``layers`` (all exponent streams in one lockstep call; checksums first)."""
    for m in layers:
        m.check_raw()
    exps = decode_many([m.encoded() for m in layers])
    return [join_float(e, m.raw, m.weight_dtype, m.name) for m, e in zip(layers, exps)]


class LosslessLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` rebuilt bit for bit from its coded exponents and raw sign/mantissa planes."""

    def __init__(self, entry: dict[str, Any], device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_entry(entry)
        self.in_features, self.out_features = int(entry["in_features"]), int(entry["out_features"])
        self.name = str(entry.get("name", "weight"))
        self.weight_dtype = getattr(torch, str(entry["dtype"]))
        self.entry = dict(entry)
        self.register_buffer("exp_stream", torch.empty(int(entry["stream_bytes"]), dtype=torch.uint8, device=device))
        self.register_buffer("exp_table", torch.empty(int(entry["table_bytes"]), dtype=torch.uint8, device=device))
        self.register_buffer("raw", torch.empty(int(entry["raw_bytes"]), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=self.weight_dtype, device=device)) if entry["bias"] else None
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, name: str, chunk_bytes: int = 262144, backend: str = "auto") -> "LosslessLinear":
        w = lin.weight.detach()
        exp, raw = split_float(w, name)
        enc = encode_codes(exp, chunk_bytes, backend, name)
        h_exp, unique = _entropy(exp)
        r_bits = 1 + _layout_of(w.dtype, name)[2]
        entry = {
            "kind": KIND_LOSSLESS, "name": name, "dtype": _dtype_name(w.dtype),
            "in_features": int(lin.in_features), "out_features": int(lin.out_features), "bias": lin.bias is not None,
            "stream_bytes": int(enc.stream.numel()), "table_bytes": int(enc.table.numel()), "raw_bytes": int(raw.numel()),
            "codec": enc.meta, "sha256": enc.sha256, "raw_sha256": tensor_digest(raw),
            "stats": {"exp_entropy": round(h_exp, 6), "unique": unique, "raw_bits": r_bits},
        }
        m = cls(entry, device=w.device)
        m.exp_stream, m.exp_table, m.raw = enc.stream.to(w.device), enc.table.to(w.device), raw.to(w.device)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
        m._weight = w.clone()  # bit-identical to what decode() returns
        return m

    def encoded(self) -> EncodedTensor:
        e = self.entry
        return EncodedTensor(self.exp_stream.cpu(), self.exp_table.cpu(), e["codec"],
                             (self.out_features, self.in_features), e["sha256"], self.name)

    def check_raw(self) -> None:
        if tensor_digest(self.raw) != self.entry["raw_sha256"]:
            tensor = self.name + ".raw"
            raise ChecksumError(f"tensor {tensor!r}: sha256 of the stored sign/mantissa planes does not match: the "
                                f"checkpoint is corrupted or truncated; re-save it from the original model", tensor=tensor)

    def decode(self) -> torch.Tensor:
        """Decode the weight (verifies both checksums): bit-identical to the original."""
        return decode_lossless([self])[0]

    def stored_bytes(self) -> dict[str, int]:
        """Bytes stored for the weight: exponent stream, its table (+ sha256), raw sign/mantissa planes."""
        return {"stream": int(self.exp_stream.numel()), "tables": int(self.exp_table.numel()) + SHA_BYTES,
                "raw": int(self.raw.numel())}

    @property
    def n_params(self) -> int:
        """Parameters this layer represents (``out * in`` + bias), as for the dense layer."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @property
    def bits(self) -> float:
        return 8.0 * sum(self.stored_bytes().values()) / max(1, self.in_features * self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The exact weight (decoded on first use, with every other pending lossless layer)."""
        if self._weight is None:
            _PENDING.add(self)
            decode_pending_lossless()
        if self._weight is None:
            self._weight = self.decode()
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype or w.device != x.device:
            w = w.to(device=x.device, dtype=x.dtype)
            b = None if b is None else b.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)

    def _apply(self, fn: Any, recurse: bool = True) -> "LosslessLinear":  # moves keep the decoded weight along
        super()._apply(fn, recurse)
        if self._weight is not None:
            self._weight = fn(self._weight)
        return self

    def describe(self) -> str:
        st = self.entry.get("stats", {})
        return f"lossless {self.entry['dtype']}, {self.bits:.2f} bits, H(exp)={st.get('exp_entropy', float('nan')):.2f}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.entry['dtype']}, "
                f"bits={self.bits:.2f}")


def _check_entry(entry: dict[str, Any]) -> None:
    need = ("in_features", "out_features", "bias", "dtype", "stream_bytes", "table_bytes", "raw_bytes", "codec",
            "sha256", "raw_sha256")
    missing = [k for k in need if k not in entry]
    if missing or str(entry.get("dtype")) not in FLOAT_LAYOUTS:
        raise ValueError(f"lossless layout entry {entry.get('name', '?')!r} lacks {missing} or names an unknown dtype "
                         f"{entry.get('dtype')!r}: the config is corrupted or was written by another acip; re-export")


def build_lossless_from_entry(entry: dict[str, Any], old: nn.Module) -> nn.Module:
    """Layout hook builder: an empty :class:`LosslessLinear` with the buffer shapes of ``entry``."""
    dev = next((t.device for t in list(old.parameters(recurse=False)) + list(old.buffers(recurse=False))), None)
    m = LosslessLinear(entry, device=dev)
    _PENDING.add(m)
    return m


@register_quantizer(LosslessConfig, "lossless")
def _lossless_linear(lin: nn.Linear, cfg: LosslessConfig, name: str) -> LosslessLinear:
    """One ``nn.Linear`` -> :class:`LosslessLinear` (exponents ANS-coded, sign/mantissa raw)."""
    return LosslessLinear.from_linear(lin, name, cfg.chunk_bytes, cfg.backend)


register_module_kind(KIND_LOSSLESS, build_lossless_from_entry)
