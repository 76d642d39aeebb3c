"""Tests for the interleaved rANS codec (acip.quant.rans) against constriction as the oracle."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from acip.quant import rans
from acip.quant.rans import (
    PROB_BITS,
    quantize_freqs,
    rans_decode,
    rans_decode_many,
    rans_encode,
    rans_encode_many,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from rans_ref import constriction_decode, constriction_encode, ideal_bits  # noqa: E402  (scripts/rans_ref.py)

TABLE_BYTES = 2 * 256  # a plain uint16 frequency table; the quantizer stores a packed one


def _roundtrip(sym: np.ndarray, n_streams: int | None = None) -> tuple[np.ndarray, dict]:
    f = quantize_freqs(np.bincount(sym, minlength=256))
    payload, meta = rans_encode(sym, f, n_streams)
    assert payload.dtype == np.uint8 and payload.ndim == 1
    out = rans_decode(payload, meta, f, sym.size)
    assert out.dtype == torch.uint8 and out.shape == (sym.size,)
    assert np.array_equal(out.numpy(), sym)
    return payload, meta


def _geometric(n: int, p: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.geometric(p, n) - 1, 255).astype(np.uint8)


def _fp8_codes(n: int, scale: float = 2.0**-8, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * scale
    return w.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def test_quantize_freqs_invariants() -> None:
    rng = np.random.default_rng(1)
    for hist in (rng.integers(0, 5, 256), np.r_[10**9, np.ones(255, np.int64)],
                 (rng.pareto(1.0, 256) * 100).astype(np.int64), np.eye(256, dtype=np.int64)[7]):
        f = quantize_freqs(hist).astype(np.int64)
        assert f.dtype == np.int64 and f.sum() == 1 << PROB_BITS
        assert ((hist > 0) <= (f > 0)).all() and (f[hist == 0] == 0).all()
    assert quantize_freqs(np.zeros(256, np.int64)).sum() == 1 << PROB_BITS
    with pytest.raises(ValueError):
        quantize_freqs(np.ones(3, np.int64))


@pytest.mark.parametrize("n", [1, 2, 5, 999, 4097, 100_003])
@pytest.mark.parametrize("n_streams", [None, 1, 7, 64])
def test_roundtrip_uniform_odd_lengths(n: int, n_streams: int | None) -> None:
    if n_streams is not None and n // n_streams > 5000:
        n = 5003  # few streams mean many lockstep steps: keep it short
    sym = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8)
    _roundtrip(sym, n_streams)


def test_roundtrip_skewed_single_empty() -> None:
    _roundtrip(_geometric(300_001, 0.4), 333)
    _roundtrip(_geometric(50_000, 0.97))  # one dominant symbol (f close to M)
    payload, meta = _roundtrip(np.full(12345, 200, np.uint8))
    assert payload.size == 0 and meta["n_streams"] == 0
    payload, meta = _roundtrip(np.zeros(0, np.uint8))
    assert payload.size == 0


def test_roundtrip_fp8_weight_codes_and_torch_payload() -> None:
    sym = _fp8_codes(768 * 512)  # codes of a Gaussian matrix as float8_e4m3 bytes
    f = quantize_freqs(np.bincount(sym, minlength=256))
    payload, meta = rans_encode(sym, f)
    out = rans_decode(torch.from_numpy(payload), meta, f, sym.size, device=torch.device("cpu"))
    assert np.array_equal(out.numpy(), sym)


def test_size_within_one_percent_of_entropy() -> None:
    sym = _geometric(1_000_000, 0.3, seed=2)
    hist = np.bincount(sym, minlength=256)
    payload, meta = rans_encode(sym, quantize_freqs(hist))
    bound = ideal_bits(hist) / 8 + TABLE_BYTES
    assert payload.size <= 1.01 * bound, (payload.size, bound)
    assert len(str(meta)) < 200  # meta carries no per-stream lists


def test_decode_many_mixed_items() -> None:
    srcs = [_geometric(n, p, seed=n) for n, p in
            [(70_000, 0.2), (1_000, 0.5), (3, 0.5), (0, 0.5), (20_000, 0.05), (9_999, 0.3)]]
    srcs.append(np.full(77, 3, np.uint8))
    items = []
    for k, s in enumerate(srcs):
        f = quantize_freqs(np.bincount(s, minlength=256))
        items.append((*rans_encode(s, f, None if k % 2 else 50), f, s.size))
    for out, s in zip(rans_decode_many(items), srcs):
        assert np.array_equal(out.numpy(), s)
        assert not out.is_inference()  # usable in place and in autograd by the caller
        out.add_(0)


@pytest.mark.parametrize("n_items", [3, 12])  # few shapes: broadcast word bases; many: gather
def test_decode_many_equal_and_distinct_shapes(n_items: int) -> None:
    srcs = [_geometric(3000 + (k % 2 if n_items == 3 else k) * 1000, 0.25, seed=k) for k in range(n_items)]
    srcs += [_geometric(4000, 0.25, seed=100 + k) for k in range(3)]  # a run of equal shapes
    items = []
    for s in srcs:
        f = quantize_freqs(np.bincount(s, minlength=256))
        items.append((*rans_encode(s, f, 40), f, s.size))
    parsed = sorted((rans._parse(*it, i) for i, it in enumerate(items)), key=lambda p: (-p["S"], p["N"]))
    plan_runs = rans._Plan(parsed, torch.device("cpu")).runs  # same order as rans_decode_many
    assert (plan_runs is None) == (n_items == 12)
    for out, s in zip(rans_decode_many(items), srcs):
        assert np.array_equal(out.numpy(), s)


def test_encode_many_equals_single() -> None:
    srcs = [_geometric(n, 0.3, seed=n) for n in (5_000, 123, 40_000)] + [np.zeros(9, np.uint8)]
    jobs = [(s, quantize_freqs(np.bincount(s, minlength=256)), k * 3 or None)
            for k, s in enumerate(srcs)]
    for (p, m), job in zip(rans_encode_many(jobs), jobs):
        p1, m1 = rans_encode(*job)
        assert np.array_equal(p, p1) and m == m1


def test_agrees_with_constriction() -> None:
    sym = _fp8_codes(200_000, 2.0**-7, seed=3)
    hist = np.bincount(sym, minlength=256)
    ref = constriction_encode(sym, hist)
    assert np.array_equal(constriction_decode(ref, hist, sym.size), sym)
    f = quantize_freqs(hist)
    payload, meta = rans_encode(sym, f)
    ours = rans_decode(payload, meta, f, sym.size).numpy()
    assert np.array_equal(ours, constriction_decode(ref, hist, sym.size))
    assert payload.size <= 1.01 * ref.nbytes + TABLE_BYTES  # same size class as the reference


def test_corruption_and_invalid_input() -> None:
    sym = _geometric(200_000, 0.3, seed=4)
    f = quantize_freqs(np.bincount(sym, minlength=256))
    payload, meta = rans_encode(sym, f)
    n_state = 4 * meta["n_streams"]
    bad = payload.copy()
    bad[n_state + (payload.size - n_state) // 2] ^= 0x10  # one bit in the middle of the words
    with pytest.raises(ValueError, match="end-of-stream|past the end"):
        rans_decode(bad, meta, f, sym.size)
    with pytest.raises(ValueError, match="payload has"):
        rans_decode(payload[:-2], meta, f, sym.size)  # truncated
    bad = payload.copy()
    bad[3] = 0xFF  # first stream state >= 2**31
    with pytest.raises(ValueError, match="state out of range"):
        rans_decode(bad, meta, f, sym.size)
    with pytest.raises(ValueError, match="n_symbols"):
        rans_decode(payload, meta, f, sym.size + 1)
    with pytest.raises(ValueError, match="lacks 'n_words'"):
        rans_decode(payload, {k: v for k, v in meta.items() if k != "n_words"}, f, sym.size)
    with pytest.raises(ValueError, match="freqs"):
        rans_decode(payload, meta, f[:-1], sym.size)
    g = f.copy()
    g[[0, 1]] = g[[1, 0]]  # wrong table, right sum
    with pytest.raises(ValueError, match="end-of-stream|past the end"):
        rans_decode(payload, meta, g, sym.size)
    with pytest.raises(ValueError, match="frequency 0"):
        rans_encode(np.array([5, 6], np.uint8), quantize_freqs(np.bincount([5, 5], minlength=256)))
    with pytest.raises(ValueError, match="uint8"):
        rans_encode(np.array([1, 2], np.int32), f)


def test_stream_default_is_long_enough() -> None:
    # the per-stream state (4 bytes) must stay well below 1% of a stream's coded bits
    assert rans.SYMBOLS_PER_STREAM * 2 / 8 > 100 * 4
