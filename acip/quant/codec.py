"""Lossless ANS coding of 8-bit codes: ``encode_codes`` / ``decode_codes`` and ``EncodedTensor``.

Each tensor is coded against its own histogram, quantized to integer frequencies ``f`` with
``sum f = 2**prob_bits``; the ideal cost is ``-sum_s c_s log2(f_s / 2**prob_bits)`` bits, within
a fraction of a percent of the empirical entropy. Two interchangeable backends:

* ``"torch"``: ``acip.quant.rans`` (interleaved rANS, lockstep torch decoder; the default);
* ``"constriction"``: the reference ``AnsCoder``, one coder per chunk of ``chunk_bytes`` symbols.

Stored per tensor (everything counts toward bits/param): the payload (uint8), the packed
frequency table (a 32-byte bitmap of used symbols + ``uint16 f-1`` per used symbol) and a
sha256 over payload, table, meta and shape, checked before every decode (a mismatch is
``acip.core.io.ChecksumError`` naming the tensor).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..core.io import ChecksumError
from . import rans
from .formats import entropy_bits

__all__ = [
    "EncodedTensor", "CodecError", "encode_codes", "decode_codes", "decode_many", "available_backends",
    "pack_table", "unpack_table",
]

SHA_BYTES = 32
BITMAP_BYTES = 32  # one bit per symbol


class CodecError(ValueError):
    """A coded tensor that cannot be decoded; the message names the tensor."""


def available_backends() -> list[str]:
    out = ["torch"]
    try:
        import constriction  # noqa: F401

        out.append("constriction")
    except ImportError:
        pass
    return out


def _resolve(backend: str) -> str:
    """``"auto"`` is ``"torch"`` (always present); ``"constriction"`` needs that package."""
    if backend == "auto":
        return "torch"
    if backend not in ("torch", "constriction"):
        raise CodecError(f"unknown codec backend {backend!r}; expected 'auto', 'torch' or 'constriction'")
    if backend not in available_backends():
        raise CodecError(f"codec backend {backend!r} is not available; pip install constriction, or use backend='torch'")
    return backend


def pack_table(freqs: np.ndarray) -> np.ndarray:
    """uint8: 32-byte bitmap of symbols with ``f > 0``, then ``f - 1`` as little-endian uint16 each."""
    f = np.asarray(freqs, dtype=np.int64)
    used = f > 0
    if (f[used] > 1 << 16).any():
        raise CodecError("frequencies above 2**16 cannot be packed; use prob_bits <= 16")
    return np.concatenate([np.packbits(used, bitorder="little"), (f[used] - 1).astype("<u2").view(np.uint8)])


def unpack_table(table: np.ndarray) -> np.ndarray:
    t = np.ascontiguousarray(np.asarray(table, dtype=np.uint8))
    used = np.unpackbits(t[:BITMAP_BYTES], bitorder="little").astype(bool)
    k = int(used.sum())
    if t.size != BITMAP_BYTES + 2 * k:
        raise CodecError(f"frequency table has {t.size} bytes, its bitmap implies {BITMAP_BYTES + 2 * k}")
    f = np.zeros(256, dtype=np.uint32)
    f[used] = t[BITMAP_BYTES:].view("<u2").astype(np.uint32) + 1
    return f


@dataclass
class EncodedTensor:
    """A losslessly coded uint8 tensor. ``nbytes`` counts payload + table + checksum."""

    stream: torch.Tensor  # uint8 payload
    table: torch.Tensor  # uint8 packed frequency table
    meta: dict[str, Any]  # small JSON dict: backend, prob_bits, n_symbols, ...
    shape: tuple[int, ...]
    sha256: str
    name: str = "tensor"
    entropy: float = field(default=0.0)  # empirical bits per symbol of the codes

    @property
    def nbytes(self) -> int:
        return int(self.stream.numel() + self.table.numel() + SHA_BYTES)

    def digest(self) -> str:
        return _digest(self.stream, self.table, self.meta, self.shape)


def _digest(stream: torch.Tensor, table: torch.Tensor, meta: dict, shape: Sequence[int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"meta": meta, "shape": list(shape)}, sort_keys=True).encode())
    h.update(table.detach().cpu().contiguous().numpy().tobytes())
    h.update(stream.detach().cpu().contiguous().numpy())  # buffer protocol: no copy
    return h.hexdigest()


def _constriction_model(freqs: np.ndarray, bits: int) -> Any:
    import constriction

    return constriction.stream.model.Categorical(freqs.astype(np.float64) / float(1 << bits), perfect=False)


def encode_codes(codes: torch.Tensor, chunk_bytes: int = 262144, backend: str = "auto", name: str = "tensor") -> EncodedTensor:
    """Entropy-code uint8 ``codes`` (any shape) against their own histogram."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{name}: encode_codes expects a torch.uint8 tensor, got {got}; view 8-bit codes with .view(torch.uint8)")
    if chunk_bytes < 1:
        raise ValueError(f"{name}: chunk_bytes must be >= 1, got {chunk_bytes}")
    be = _resolve(backend)
    sym = codes.detach().cpu().contiguous().reshape(-1).numpy()
    n = int(sym.size)
    hist = np.bincount(sym, minlength=256)
    freqs, bits = np.asarray(rans.quantize_freqs(hist), dtype=np.uint32), rans.PROB_BITS
    meta: dict[str, Any] = {"backend": be, "prob_bits": bits, "n_symbols": n}
    if n == 0 or int(freqs.max()) == 1 << bits:  # empty, or a single symbol: nothing to code
        payload = np.zeros(0, dtype=np.uint8)
    elif be == "torch":
        streams = max(1, math.ceil(n / min(int(chunk_bytes), rans.SYMBOLS_PER_STREAM)))
        payload, rmeta = rans.rans_encode(sym, freqs, streams)
        meta["rans"] = rmeta
    else:
        import constriction

        model = _constriction_model(freqs, bits)
        chunks, counts = [], []
        for lo in range(0, n, chunk_bytes):
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(sym[lo: lo + chunk_bytes].astype(np.int32), model)
            words = coder.get_compressed().astype("<u4")
            chunks.append(words)
            counts.append(words.size)
        meta["chunk_symbols"] = int(chunk_bytes)
        payload = np.concatenate([np.asarray(counts, dtype="<u4")] + chunks).view(np.uint8)
    stream = torch.from_numpy(np.ascontiguousarray(payload).copy())
    table = torch.from_numpy(pack_table(freqs))
    shape = tuple(int(s) for s in codes.shape)
    return EncodedTensor(stream, table, meta, shape, _digest(stream, table, meta, shape), name, entropy_bits(codes))


def _check(enc: EncodedTensor) -> np.ndarray:
    if enc.digest() != enc.sha256:
        raise ChecksumError(
            f"tensor {enc.name!r}: sha256 of the stored stream does not match ({enc.stream.numel()} payload bytes): "
            f"the checkpoint is corrupted or truncated; re-save it from the original model", tensor=enc.name
        )
    return unpack_table(enc.table.cpu().numpy())


def _decode_constriction(enc: EncodedTensor, freqs: np.ndarray) -> np.ndarray:
    import constriction

    n, c = int(enc.meta["n_symbols"]), int(enc.meta["chunk_symbols"])
    k = math.ceil(n / c)
    buf = enc.stream.cpu().numpy()
    counts = buf[: 4 * k].view("<u4").astype(np.int64)
    words = buf[4 * k:].view("<u4")
    if int(counts.sum()) != words.size:
        raise CodecError(f"tensor {enc.name!r}: chunk table says {int(counts.sum())} words, stream holds {words.size}")
    model = _constriction_model(freqs, int(enc.meta["prob_bits"]))
    out, off = [], 0
    for i in range(k):
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words[off: off + counts[i]], dtype=np.uint32))
        out.append(coder.decode(model, min(c, n - i * c)).astype(np.uint8))
        off += int(counts[i])
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def decode_many(encs: Sequence[EncodedTensor], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Decode several tensors (rANS tensors in one lockstep run); bit-identical uint8 codes."""
    out: list[torch.Tensor | None] = [None] * len(encs)
    batch = []
    for i, enc in enumerate(encs):
        freqs = _check(enc)
        n = int(enc.meta["n_symbols"])
        if enc.stream.numel() == 0:
            fill = int(np.argmax(freqs)) if n else 0
            out[i] = torch.full(enc.shape, fill, dtype=torch.uint8)
        elif enc.meta["backend"] == "torch":
            batch.append((i, (enc.stream, enc.meta["rans"], freqs, n)))
        else:
            out[i] = torch.from_numpy(_decode_constriction(enc, freqs)).reshape(enc.shape)
    if batch:
        try:
            dec = rans.rans_decode_many([b for _, b in batch], device="cpu")
        except ValueError as e:
            names = [encs[i].name for i, _ in batch]
            raise CodecError(f"rANS decode failed for one of {names}: {e}") from None
        for (i, _), d in zip(batch, dec):
            out[i] = d.reshape(encs[i].shape)
    return [o.to(device) for o in out]  # type: ignore[union-attr]


def decode_codes(enc: EncodedTensor) -> torch.Tensor:
    """Decode one tensor; verifies its sha256 first (:class:`ChecksumError` names the tensor)."""
    return decode_many([enc])[0]
