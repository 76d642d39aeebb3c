"""Interleaved rANS codec for 8-bit codes with a lockstep, vectorised torch decoder.

Coding scheme (one tensor, alphabet of 256 symbols, precision ``M = 2**PROB_BITS``):

* ``quantize_freqs`` turns a histogram into integer frequencies ``f[s] >= 1`` for every symbol
  that occurs, ``sum(f) == M``; ``cum[s] = f[0] + ... + f[s-1]``.
* Symbol ``i`` of the input goes to stream ``k = i % N`` at step ``t = i // N``; stream ``k``
  holds ``S`` or ``S - 1`` symbols (``S = ceil(n / N)``; the first ``n - (S-1) N`` streams are
  the long ones). All ``N`` streams are coded independently and decoded in lockstep.
* State ``x`` is a 31-bit integer with the renormalisation invariant ``L <= x < L * 2**16``,
  ``L = 2**15`` (so every state fits a signed int32 tensor). Words are 16 bits.
* Encode (reverse order, per stream): if ``x >= ((L >> PROB_BITS) << 16) * f[s]`` emit the low
  16 bits and ``x >>= 16``; then ``x = (x // f[s]) * M + cum[s] + x % f[s]``. The encoder starts
  at ``x = L``; its final state is stored and is the decoder's initial state.
* Decode (forward, per stream): ``slot = x & (M-1)``, ``s = sym[slot]``,
  ``x = f[s] * (x >> PROB_BITS) + slot - cum[s]``; then if ``x < L`` read one word:
  ``x = (x << 16) | word``. Since ``x >= L`` before the step, ``x >> PROB_BITS >= 8`` and one
  word always restores ``x >= L`` (at most one read per step and stream).
* Integrity: after the last symbol every stream must be back at ``x == L`` and the words must
  be consumed exactly; any mismatch raises ``ValueError`` (a cheap ~15-bit check per stream).

Payload (flat little-endian uint8): ``N x uint32`` initial decoder states, then the 16-bit words
interleaved in decode order (Giesen's interleaved rANS): step 0's words of the streams that
renormalise, in stream order, then step 1's, ... The decoder finds each stream's word with a
prefix sum over the "needs a word" flags, so all reads of a step are contiguous (cache and TLB
friendly) and no per-stream lengths are stored. ``meta`` is a small dict of ints. Cost per
stream: the 4-byte state, of which ~1 byte carries data on average (~0.25% at 4096 symbols of
~3 bits per stream).

The decoder runs all streams of many tensors at once (``rans_decode_many``): the Python loop is
over lockstep steps only; each step is ~15-20 int32/int64 tensor ops over the active streams,
so the same code runs on a GPU. Decode a whole model in one call: one tensor alone gives too
few streams to amortise the per-op cost. Tensors with one symbol value (or none) have an empty
payload.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np
import torch

PROB_BITS: int = 12
"""Frequency precision; with ``L = 2**15`` keeps ``L / M = 8`` and a 24-bit packed table entry."""
M: int = 1 << PROB_BITS
STATE_LO: int = 1 << 15  # L
WORD_BITS: int = 16
SYMBOLS_PER_STREAM: int = 4096
"""Default stream length (auto ``n_streams = ceil(n / SYMBOLS_PER_STREAM)``): longer streams cost
fewer state bytes, shorter ones give more lockstep width (see docs/BENCHMARKS.md)."""
FORMAT: str = "acip-rans32x16"
_FLUSH_STEPS = 128  # rows buffered before conversion to uint8, and steps between bound checks

__all__ = [
    "PROB_BITS", "quantize_freqs", "rans_encode", "rans_encode_many", "rans_decode",
    "rans_decode_many", "entropy_bits",
]


def entropy_bits(hist: np.ndarray) -> float:
    """Empirical entropy ``sum(-c log2(c/n))`` in bits of a histogram (total, not per symbol)."""
    c = np.asarray(hist, dtype=np.float64)
    c = c[c > 0]
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n > 0 else 0.0


def quantize_freqs(hist: np.ndarray) -> np.ndarray:
    """Integer frequencies ``f`` (uint32[256], ``sum(f) == 2**PROB_BITS``) close to ``hist``.

    Every symbol with ``count > 0`` gets ``f >= 1``; symbols with count 0 get 0. Starting from
    ``max(1, floor(p * M))`` the remaining mass is handed out greedily to the symbols whose
    increment lowers the cross-entropy ``-sum(c * log2(f / M))`` most (removals symmetrically,
    from the symbols where it costs least). An all-zero histogram gives a
    uniform table (nothing will be coded against it).
    """
    c = np.asarray(hist, dtype=np.int64).reshape(-1)
    if c.shape != (256,) or (c < 0).any():
        raise ValueError(f"hist must be 256 non-negative counts, got shape {c.shape}")
    used = c > 0
    k = int(used.sum())
    if k == 0:
        return np.full(256, M // 256, dtype=np.uint32)
    if k > M:
        raise ValueError(f"{k} distinct symbols cannot fit PROB_BITS={PROB_BITS}")
    cf = c.astype(np.float64)
    f = np.where(used, np.maximum(1, np.floor(cf * M / cf.sum())), 0).astype(np.int64)
    while (d := M - int(f.sum())) != 0:
        if d > 0:  # gain of f -> f+1, best first; several at once when d is large
            with np.errstate(divide="ignore", invalid="ignore"):
                gain = np.where(used, cf * np.log2((f + 1) / np.maximum(f, 1)), -np.inf)
            idx = np.argsort(-gain, kind="stable")[: min(d, k)]
            f[idx] += 1
        else:  # cost of f -> f-1 (only f > 1), cheapest first
            with np.errstate(divide="ignore", invalid="ignore"):
                cost = np.where(f > 1, cf * np.log2(f / np.maximum(f - 1, 1)), np.inf)
            idx = np.argsort(cost, kind="stable")[: min(-d, int((f > 1).sum()))]
            f[idx] -= 1
    return f.astype(np.uint32)


def _check_freqs(freqs: np.ndarray) -> np.ndarray:
    f = np.asarray(freqs).astype(np.int64).reshape(-1)
    if f.shape != (256,) or (f < 0).any() or int(f.sum()) != M:
        raise ValueError(f"freqs must be 256 non-negative ints summing to 2**{PROB_BITS}")
    return f


def _auto_streams(n: int) -> int:
    return max(1, math.ceil(n / SYMBOLS_PER_STREAM))


def rans_encode(
    symbols: np.ndarray, freqs: np.ndarray, n_streams: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Encode uint8 ``symbols`` against ``freqs`` into ``N`` interleaved rANS streams.

    ``n_streams=None`` picks ``ceil(n / SYMBOLS_PER_STREAM)``; it is capped at ``n``. Returns
    ``(payload, meta)``: payload a flat uint8 array, meta a JSON-serialisable dict of ints.
    Many tensors encode faster together with ``rans_encode_many``.
    """
    return rans_encode_many([(symbols, freqs, n_streams)])[0]


def rans_encode_many(
    items: Sequence[tuple[np.ndarray, np.ndarray, int | None]],
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Encode ``(symbols, freqs, n_streams)`` items, all streams of all items in lockstep.

    numpy, vectorised over streams; the Python loop runs over the (reverse) steps only.
    Each item's output is exactly what ``rans_encode`` gives for it alone.
    """
    res: list[tuple[np.ndarray, dict[str, Any]] | None] = [None] * len(items)
    jobs = []
    for i, (symbols, freqs, n_streams) in enumerate(items):
        sym = np.ascontiguousarray(np.asarray(symbols).reshape(-1))
        if sym.dtype != np.uint8:
            raise ValueError(f"item {i}: symbols must be uint8, got {sym.dtype}")
        f = _check_freqs(freqs)
        n = int(sym.size)
        meta: dict[str, Any] = {"format": FORMAT, "prob_bits": PROB_BITS, "n_symbols": n,
                                "n_streams": 0, "n_words": 0}
        if n and (f[sym] == 0).any():
            bad = np.unique(sym[f[sym] == 0])[:8].tolist()
            raise ValueError(f"item {i}: symbols {bad} occur but have frequency 0")
        if n == 0 or f.max() == M:  # nothing to code: empty, or a single symbol (0 bits)
            res[i] = (np.zeros(0, dtype=np.uint8), meta)
            continue
        N = int(n_streams) if n_streams is not None else _auto_streams(n)
        if N < 1:
            raise ValueError(f"item {i}: n_streams must be >= 1, got {n_streams}")
        N = min(N, n)
        jobs.append((i, sym, f, N, -(-n // N), meta))
    if not jobs:
        return res  # type: ignore[return-value]
    jobs.sort(key=lambda j: -j[4])
    cols = np.cumsum([0] + [j[3] for j in jobs])
    n_tot, s_max = int(cols[-1]), jobs[0][4]
    rows = np.zeros((s_max, n_tot), dtype=np.uint8)
    lens = np.empty(n_tot, dtype=np.int64)  # symbols per stream
    ftab = np.zeros(256 * len(jobs), dtype=np.int64)
    ctab = np.zeros_like(ftab)
    goff = np.repeat(np.arange(len(jobs), dtype=np.int64) * 256, np.diff(cols))
    for g, (_, sym, f, N, S, _) in enumerate(jobs):
        pad = np.zeros(S * N, dtype=np.uint8)
        pad[: sym.size] = sym
        rows[:S, cols[g]: cols[g + 1]] = pad.reshape(S, N)
        lens[cols[g]: cols[g + 1]] = S - (np.arange(N) >= sym.size - (S - 1) * N)
        ftab[256 * g: 256 * g + 256] = f
        ctab[256 * g: 256 * g + 256] = np.concatenate([[0], np.cumsum(f)[:-1]])
    xmtab = ((STATE_LO >> PROB_BITS) << WORD_BITS) * ftab  # emit threshold per symbol
    x = np.full(n_tot, STATE_LO, dtype=np.int64)
    gid = np.repeat(np.arange(len(jobs), dtype=np.int16), np.diff(cols))
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    changes = set(lens.tolist()) | {s_max}
    idx: Any = slice(None)
    for t in range(s_max - 1, -1, -1):
        if t + 1 in changes:  # the set of streams holding a symbol at step t changed
            act = np.flatnonzero(lens > t)
            idx = slice(None) if act.size == n_tot else act
        si = rows[t, idx] + goff[idx]
        xs = x[idx]
        fs = ftab[si]
        emit = np.flatnonzero(xs >= xmtab[si])
        if emit.size:
            blocks.append((gid[idx][emit], (xs[emit] & 0xFFFF).astype(np.uint16)))
            xs[emit] >>= WORD_BITS
        q, r = np.divmod(xs, fs)
        x[idx] = q * M + ctab[si] + r
    # decoder reads step 0's words first (stream order within a step); encoder went backwards
    g_all = np.concatenate([b[0] for b in blocks[::-1]]) if blocks else np.zeros(0, np.int16)
    w_all = np.concatenate([b[1] for b in blocks[::-1]]) if blocks else np.zeros(0, np.uint16)
    w_all = w_all[np.argsort(g_all, kind="stable")]  # group by item, keep decode order
    wcuts = np.cumsum(np.r_[0, np.bincount(g_all, minlength=len(jobs))])
    for g, (i, _, _, N, _, meta) in enumerate(jobs):
        words = w_all[wcuts[g]: wcuts[g + 1]]
        xs = x[cols[g]: cols[g + 1]]
        payload = np.concatenate([xs.astype("<u4").view(np.uint8),
                                  words.astype("<u2").view(np.uint8)])
        meta.update(n_streams=N, n_words=int(words.size))
        res[i] = (payload, meta)
    return res  # type: ignore[return-value]


def _packed_table(f: np.ndarray) -> np.ndarray:
    """int32[M]: ``sym << 24 | (slot - cum[sym]) << 12 | f[sym]`` for every slot (f < M)."""
    s = np.repeat(np.arange(256, dtype=np.int64), f)
    cum = np.concatenate([[0], np.cumsum(f)[:-1]])
    bias = np.arange(M, dtype=np.int64) - cum[s]
    return ((s << 24) | (bias << PROB_BITS) | f[s]).astype(np.uint32).view(np.int32)


def _parse(payload: Any, meta: dict, freqs: np.ndarray, n_symbols: int, i: int) -> dict:
    """Validate one item structurally and split its payload into states and words."""
    where = f"item {i}: "
    if not isinstance(meta, dict):
        raise ValueError(f"{where}meta must be a dict")
    for key in ("format", "prob_bits", "n_symbols", "n_streams", "n_words"):
        if key not in meta:
            raise ValueError(f"{where}meta lacks '{key}'")
    if meta["format"] != FORMAT or int(meta["prob_bits"]) != PROB_BITS:
        raise ValueError(f"{where}unsupported format {meta['format']!r}/{meta['prob_bits']}")
    n, N, W = (int(meta[k]) for k in ("n_symbols", "n_streams", "n_words"))
    if n != int(n_symbols):
        raise ValueError(f"{where}n_symbols={n_symbols} but meta says {n}")
    f = _check_freqs(freqs)
    if isinstance(payload, torch.Tensor):
        payload = payload.detach().cpu().numpy()
    buf = np.ascontiguousarray(np.asarray(payload, dtype=np.uint8).reshape(-1))
    if N < 0 or W < 0 or N > max(n, 0) or (n > 0 and N == 0 and f.max() != M):
        raise ValueError(f"{where}invalid meta: n_streams={N}, n_words={W}, n_symbols={n}")
    if N == 0:
        if buf.size or W:
            raise ValueError(f"{where}payload has {buf.size} bytes but meta has no streams")
        return {"n": n, "N": 0, "f": f}
    if f.max() == M:
        raise ValueError(f"{where}freqs hold a single symbol but meta has {N} streams")
    need = N * 4 + 2 * W
    if buf.size != need:
        raise ValueError(f"{where}payload has {buf.size} bytes, meta implies {need} "
                         f"({N} streams, {W} words): truncated or corrupted")
    states = buf[: 4 * N].view("<u4").astype(np.int64)
    if ((states < STATE_LO) | (states >= STATE_LO << WORD_BITS)).any():
        raise ValueError(f"{where}initial stream state out of range: corrupted payload")
    S = -(-n // N)
    return {"n": n, "N": N, "S": S, "r": n - (S - 1) * N, "f": f, "W": W,
            "states": states, "words": buf[4 * N:].view("<u2")}


def rans_decode_many(
    items: Sequence[tuple[Any, dict, np.ndarray, int]], device: str | torch.device = "cpu",
    threads: int | None = 1,
) -> list[torch.Tensor]:
    """Decode many ``(payload, meta, freqs, n_symbols)`` items in one lockstep run.

    All streams of all items advance together (items sorted by steps, so the active streams are
    a prefix), which lets small tensors share the per-step cost: the fast path for a whole
    model. Per step, for the active streams: table lookup, state update, ``need = x < L``,
    a prefix sum of ``need`` within each item gives each stream's word position,
    one gather, and the conditional shift-in. Returns bit-identical uint8 tensors on
    ``device``; raises ``ValueError`` on invalid input or a failed end-of-stream check.

    ``threads``: torch intra-op threads during a CPU decode (restored afterwards); ``None``
    keeps the current setting. The default 1 is deliberate: the per-step tensors are small and
    on a shared or oversubscribed CPU, OpenMP workers waiting for each other made decoding
    up to 20x slower here.
    """
    dev = torch.device(device)
    if threads is None or dev.type != "cpu" or threads == torch.get_num_threads():
        return _decode_many(items, dev)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _decode_many(items, dev)
    finally:
        torch.set_num_threads(prev)


def _decode_many(items: Sequence[tuple[Any, dict, np.ndarray, int]], dev: torch.device
                 ) -> list[torch.Tensor]:
    parsed = [_parse(p, m, fr, n, i) for i, (p, m, fr, n) in enumerate(items)]
    out: list[torch.Tensor | None] = [None] * len(parsed)
    coded = []
    for i, it in enumerate(parsed):
        if it["N"] == 0:
            fill = int(np.argmax(it["f"])) if it["n"] else 0
            out[i] = torch.full((it["n"],), fill, dtype=torch.uint8, device=dev)
        else:
            coded.append(i)
    if not coded:
        return out  # type: ignore[return-value]
    coded.sort(key=lambda i: -parsed[i]["S"])  # active streams (and items) form a prefix
    G = len(coded)
    cols = np.cumsum([0] + [parsed[i]["N"] for i in coded])
    wst = np.cumsum([0] + [parsed[i]["W"] for i in coded])
    n_tot, w_tot, s_max = int(cols[-1]), int(wst[-1]), parsed[coded[0]]["S"]
    ends: dict[int, list[tuple[int, int, bool]]] = {}  # step -> stream ranges finishing there
    act, gact = np.zeros(s_max, np.int64), np.zeros(s_max, np.int64)
    for g, i in enumerate(coded):
        N, S, r = parsed[i]["N"], parsed[i]["S"], parsed[i]["r"]
        ends.setdefault(S - 1, []).append((int(cols[g]), int(cols[g]) + r, False))
        if r < N:  # short streams end one step early; park them at a state that never reads
            ends.setdefault(S - 2, []).append((int(cols[g]) + r, int(cols[g + 1]), True))
        act[:S] += N
        gact[:S] += 1
    i32 = dict(dtype=torch.int32, device=dev)

    def cat(arrs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrs).astype(np.int32)).to(dev)

    table = torch.from_numpy(np.concatenate([_packed_table(parsed[i]["f"]) for i in coded]))
    table = table.to(dev)
    K = min(_FLUSH_STEPS, s_max)
    # word 0 is a guard; the tail guard absorbs reads of non-reading streams and, for a corrupt
    # payload, up to K steps of over-reading between two bound checks (no clamp in the loop)
    wbuf = torch.empty(1 + w_tot + (K + 1) * n_tot, **i32)
    wbuf[0] = 0
    wbuf[1 + w_tot:] = 0
    if w_tot:
        wbuf[1: 1 + w_tot] = cat([parsed[i]["words"] for i in coded])
    x = cat([parsed[i]["states"] for i in coded])
    gid = cat([np.full(parsed[i]["N"], g) for g, i in enumerate(coded)])
    tof = gid * M
    base = torch.from_numpy(wst[:-1].astype(np.int64)).to(dev)  # position of last word read
    bounds = torch.from_numpy(cols.astype(np.int64)).to(dev)
    c = {k: torch.tensor(v, **i32) for k, v in
         dict(mask=M - 1, p=PROB_BITS, lo=STATE_LO, s31=31, park=1 << 30).items()}
    x_end = torch.empty_like(x)
    res = torch.empty((s_max, n_tot), dtype=torch.uint8, device=dev)
    ebuf = torch.empty((K, n_tot), **i32)
    if sys.byteorder != "little":
        raise RuntimeError("the rANS decoder assumes a little-endian host")
    ebytes = ebuf.view(torch.uint8).view(K, n_tot, 4)
    # nc[0] = 0; nc[k+1] = -(number of reads in 0..k); int64 (torch's int32 cumsum is slower)
    nc = torch.zeros(n_tot + 1, dtype=torch.int64, device=dev)
    pbuf = torch.empty(n_tot, dtype=torch.int64, device=dev)
    bufs = [torch.empty(n_tot, **i32) for _ in range(4)]
    views: dict[int, tuple[Any, ...]] = {}
    t0 = 0
    for t in range(s_max):
        a, ga = int(act[t]), int(gact[t])
        if a not in views:
            views[a] = (x[:a], tof[:a], gid[:a], nc[1: a + 1], nc[a], base[:ga],
                        bounds[: ga + 1], [row[:a] for row in ebuf], pbuf[:a],
                        *(b[:a] for b in bufs))
        xa, ta, ga_id, nca, nc_a, ba, bd, erows, pa, b1, b2, b3, b4 = views[a]
        slot = torch.bitwise_and(xa, c["mask"], out=b1)
        if G > 1:
            slot.add_(ta)
        e = torch.index_select(table, 0, slot, out=erows[t - t0])
        fv = torch.bitwise_and(e, c["mask"], out=b2)
        bv = torch.bitwise_right_shift(e, c["p"], out=b3).bitwise_and_(c["mask"])
        xa.bitwise_right_shift_(c["p"])
        torch.addcmul(bv, fv, xa, out=xa)  # x = f * (x >> P) + slot - cum
        m = torch.sub(xa, c["lo"], out=b4).bitwise_right_shift_(c["s31"])  # -1 where x < L
        torch.cumsum(m, 0, out=nca)
        if G > 1:  # per item: last word read + reads up to and including this stream
            nb = torch.index_select(nc, 0, bd)
            d = torch.add(ba, nb[:-1])
            ba.add_(nb[:-1]).sub_(nb[1:])
            pos = torch.index_select(d, 0, ga_id, out=pa).sub_(nca)
        else:
            pos = torch.sub(ba, nca, out=pa)
            ba.sub_(nc_a)
        w = torch.index_select(wbuf, 0, pos, out=b2)
        # readers (x < L < 2**16) get x * 2**16 + w; the int32 product may wrap for the others,
        # whose m is 0, so it is discarded
        torch.addcmul(xa, m, torch.add(w, xa, alpha=(1 << WORD_BITS) - 1, out=b3), value=-1,
                      out=xa)
        for lo, hi, park in ends.get(t, ()):
            x_end[lo:hi] = x[lo:hi]
            if park:
                x[lo:hi] = c["park"]
        if t - t0 + 1 == K or t == s_max - 1:
            res[t0: t + 1].copy_(ebytes[: t + 1 - t0, :, 3])  # top byte = symbol
            t0 = t + 1
            if int(base.max()) > w_tot:
                raise ValueError("rANS streams read past the end of their words: corrupted "
                                 "payload or wrong freqs")
    bad_w = (base != torch.from_numpy(wst[1:].astype(np.int64)).to(dev)).tolist()
    bad = (x_end != STATE_LO).to(torch.int32)
    for g, i in enumerate(coded):
        lo, hi = int(cols[g]), int(cols[g + 1])
        nb = int(bad[lo:hi].sum())
        if nb or bad_w[g]:
            raise ValueError(f"item {i}: {nb} of {hi - lo} rANS streams failed the end-of-stream "
                             f"check (words consumed ok: {not bad_w[g]}): corrupted payload or "
                             "wrong freqs")
        S, n = parsed[i]["S"], parsed[i]["n"]
        blk = res[:S, lo:hi]
        out[i] = (blk.reshape(-1) if hi - lo == n_tot else blk.contiguous().view(-1))[:n]
    return out  # type: ignore[return-value]


def rans_decode(
    payload: Any, meta: dict, freqs: np.ndarray, n_symbols: int,
    device: str | torch.device = "cpu", threads: int | None = 1,
) -> torch.Tensor:
    """Decode one item (see ``rans_decode_many``); returns a uint8 tensor of ``n_symbols``."""
    return rans_decode_many([(payload, meta, freqs, n_symbols)], device, threads)[0]
