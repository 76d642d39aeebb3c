"""ANS container: bit-identical decode, sizes near the entropy, checksum and truncation errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from acip.core.io import ChecksumError
from acip.quant.codec import (
    CodecError,
    EncodedTensor,
    available_backends,
    decode_codes,
    decode_many,
    encode_codes,
    pack_table,
    unpack_table,
)

BACKENDS = available_backends()


def _codes(n: int, seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * spread).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)


def test_constriction_backend_is_available() -> None:
    assert "constriction" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 13), (300, 257)])
def test_random_codes_decode_bit_identical(backend: str, shape: tuple[int, ...]) -> None:
    codes = _codes(math.prod(shape), seed=sum(shape)).reshape(shape)
    enc = encode_codes(codes, chunk_bytes=4096, backend=backend, name="rand")
    out = decode_codes(enc)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out, codes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_256_symbols_and_constant_tensor(backend: str) -> None:
    every = torch.arange(256, dtype=torch.uint8).repeat(40)[torch.randperm(256 * 40)]
    assert torch.equal(decode_codes(encode_codes(every, 2048, backend)), every)
    const = torch.full((33, 5), 7, dtype=torch.uint8)
    enc = encode_codes(const, 2048, backend)
    assert enc.stream.numel() == 0  # a single symbol costs no payload
    assert torch.equal(decode_codes(enc), const)


def test_backends_decode_identically() -> None:
    assert set(BACKENDS) >= {"torch", "constriction"}, BACKENDS  # both codecs must be installed
    codes = _codes(200_000, seed=3).reshape(400, 500)
    outs = [decode_codes(encode_codes(codes, 65536, b)) for b in BACKENDS]
    for o in outs:
        assert torch.equal(o, codes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coded_size_within_one_percent_of_entropy(backend: str) -> None:
    codes = _codes(500_000, seed=1, spread=2.0)
    enc = encode_codes(codes, 262144, backend)
    hist = np.bincount(codes.numpy(), minlength=256)
    p = hist[hist > 0] / hist.sum()
    entropy_bytes = float(-(hist[hist > 0] * np.log2(p)).sum()) / 8
    assert abs(enc.entropy - float(-(p * np.log2(p)).sum())) < 1e-9
    assert enc.stream.numel() <= 1.01 * entropy_bytes
    assert enc.nbytes == enc.stream.numel() + enc.table.numel() + 32


def test_table_packing_roundtrip_is_compact() -> None:
    f = np.zeros(256, dtype=np.uint32)
    f[[0, 3, 255]] = [4000, 95, 1]
    t = pack_table(f)
    assert t.size == 32 + 2 * 3
    assert np.array_equal(unpack_table(t), f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_stream_raises_checksum_error_naming_tensor(backend: str) -> None:
    enc = encode_codes(_codes(50_000, seed=2), 8192, backend, name="layers.3.mlp.up_proj")
    bad = enc.stream.clone()
    bad[len(bad) // 2] ^= 0x5A
    broken = EncodedTensor(bad, enc.table, enc.meta, enc.shape, enc.sha256, enc.name)
    with pytest.raises(ChecksumError, match="layers.3.mlp.up_proj") as err:
        decode_codes(broken)
    assert err.value.tensor == "layers.3.mlp.up_proj"


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_stream_raises_checksum_error(backend: str) -> None:
    enc = encode_codes(_codes(50_000, seed=4), 8192, backend, name="lm.q_proj")
    cut = EncodedTensor(enc.stream[:-10].clone(), enc.table, enc.meta, enc.shape, enc.sha256, enc.name)
    with pytest.raises(ChecksumError, match="corrupted or truncated"):
        decode_codes(cut)


def test_decode_many_mixes_sizes() -> None:
    items = [_codes(n, seed=n) for n in (10, 5000, 70_000)]
    encs = [encode_codes(c, 4096, name=f"t{i}") for i, c in enumerate(items)]
    for c, o in zip(items, decode_many(encs)):
        assert torch.equal(c, o)


def test_bad_input_errors() -> None:
    with pytest.raises(TypeError, match="uint8"):
        encode_codes(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(CodecError, match="unknown codec backend"):
        encode_codes(torch.zeros(4, dtype=torch.uint8), backend="zip")
