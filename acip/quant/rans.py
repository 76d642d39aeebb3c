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
stream: the 4-byte state, of which ~1 byte carries data on average (4 bytes are ~0.25% of 4096
symbols of ~3 bits; measured +0.28% over the entropy on SmolLM2-scale codes, +0.46% at 2048).

The decoder runs all streams of many tensors at once (``rans_decode_many``): the Python loop is
over lockstep steps only; each step is ~19 int32 tensor ops over the active streams (four
gathers: symbol table, frequency table, per-tensor word base, words; one prefix sum), so the
same code runs on a GPU. Per tensor it keeps a uint8 slot -> symbol table (4 KiB) and an int32
symbol -> (f, cum) table (1 KiB), small enough for the CPU caches with hundreds of tensors.
Decode a whole model in one call: one tensor alone gives too few streams to amortise the
per-op cost. Tensors with one symbol value (or none) have an empty payload.
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
_MAX_RUNS = 8  # up to this many runs of equal-shape items: broadcast word bases, else gather
WORD_BITS: int = 16
SYMBOLS_PER_STREAM: int = 4096
"""Default stream length (auto ``n_streams = ceil(n / SYMBOLS_PER_STREAM)``): longer streams cost
fewer state bytes, shorter ones mean fewer lockstep steps but more streams per step. On the
SmolLM2-scale benchmark with core 1 free (docs/BENCHMARKS.md, stream length sweep) 4096 decoded
fastest (+0.48% over the entropy incl. tables) ahead of 2048 (+0.66%); 2048 halves the time of a
small (lazy-mode) pass. The decoder reads the stream count from each payload's meta."""
FORMAT: str = "acip-rans32x16"

__all__ = [
    "PROB_BITS", "quantize_freqs", "rans_encode", "rans_encode_many", "rans_decode",
    "rans_decode_many",
]


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


def _tables(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode tables of one item: ``sym`` (uint8[M], the symbol of every slot) and ``fc``
    (int32[256]: ``f[s] | -cum[s] << 12``, so ``fc & (M-1) = f`` and ``fc >> 12 = -cum``).

    Two small tables (4 KiB + 1 KiB per tensor) instead of one packed int32[M] entry per slot
    (16 KiB): the lockstep gathers hit the CPU caches far more often for many tensors.
    """
    cum = np.concatenate([[0], np.cumsum(f)[:-1]]).astype(np.int64)
    sym = np.repeat(np.arange(256, dtype=np.uint8), f)
    return sym, (f.astype(np.int64) | (-cum << PROB_BITS)).astype(np.int32)


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
    return {"n": n, "N": N, "S": S, "r": n - (S - 1) * N, "f": f, "W": W, "i": i,
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
    ``device`` (outputs of equal-shape items are views into one shared allocation); raises
    ``ValueError`` on invalid input or a failed end-of-stream check.

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
    # active streams (and items) form a prefix; equal shapes side by side (see _Plan.groups)
    coded.sort(key=lambda i: (-parsed[i]["S"], parsed[i]["N"]))
    plan = _Plan([parsed[i] for i in coded], dev)
    bufs = plan.run()
    for g, i in enumerate(coded):
        out[i] = bufs[g][: parsed[i]["n"]]
    return out  # type: ignore[return-value]


class _Plan:
    """One lockstep decode of several coded items (all tensors on ``dev``).

    Per step ``t``, over the ``a`` active streams (a prefix: items are sorted by steps):

    1. ``slot = x & (M-1)``; ``s = sym[item * M + slot]`` (gathered straight into a uint8
       staging row), ``fc = fctab[item * 256 + s]``;
    2. ``x = f * (x >> P) + slot - cum`` with ``f = fc & (M-1)``, ``-cum = fc >> P``;
    3. ``m = (x - L) >> 31`` is -1 for the streams that need a word; ``-cumsum(m)`` numbers them
       within the step, the per-item word counter ``base`` turns that into each stream's word
       position (one gather broadcasts ``base`` when there are several items), one gather
       reads the words;
    4. readers get ``x = x * 2**16 + w``, i.e. ``x - m * (w + (2**16 - 1) x)``.

    ~19 torch calls per step, all into preallocated buffers (int32 wherever the word count
    allows). Every ``K`` steps the staging block is copied to each item's output (``S x N``
    row-major: symbol ``t*N + k`` is stream ``k``'s ``t``-th).
    """

    def __init__(self, its: list[dict], dev: torch.device) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("the rANS decoder assumes a little-endian host")
        self.its, self.dev = its, dev
        self.G = G = len(its)
        self.cols = np.cumsum([0] + [it["N"] for it in its])
        self.wst = np.cumsum([0] + [it["W"] for it in its])
        self.n_tot, self.w_tot, self.s_max = int(self.cols[-1]), int(self.wst[-1]), its[0]["S"]
        # step -> stream ranges finishing there; short streams end one step early and are
        # parked at a state that never reads
        self.ends: dict[int, list[tuple[int, int, bool]]] = {}
        self.act = np.zeros(self.s_max, np.int64)
        self.gact = np.zeros(self.s_max, np.int64)
        for g, it in enumerate(its):
            lo, hi, S, r = int(self.cols[g]), int(self.cols[g + 1]), it["S"], it["r"]
            self.ends.setdefault(S - 1, []).append((lo, lo + r, False))
            if r < it["N"]:
                self.ends.setdefault(S - 2, []).append((lo + r, hi, True))
            self.act[:S] += it["N"]
            self.gact[:S] += 1
        # runs of items with equal (S, N): their word bases broadcast over a (items x N) view
        # with one op per run instead of one gather over all streams, when there are few runs
        runs: list[tuple[int, int]] = []
        for g, it in enumerate(its):
            if runs and (its[runs[-1][0]]["S"], its[runs[-1][0]]["N"]) == (it["S"], it["N"]):
                runs[-1] = (runs[-1][0], g + 1)
            else:
                runs.append((g, g + 1))
        self.all_runs = runs  # also the unit of output allocation and staging copies
        self.runs = runs if G > 1 and len(runs) <= _MAX_RUNS else None
        # staging rows between copies to the outputs: more items, fewer (per-item) copies
        self.K = min(self.s_max, 128 if G <= 256 else 512)
        self.wbuf_len = 1 + self.w_tot + (self.K + 1) * self.n_tot
        self.idx_dtype = torch.int32 if self.wbuf_len < 2**31 - 1 else torch.int64

    def _words(self) -> torch.Tensor:
        """int32 word buffer: a zero guard, every item's words, and a zero tail that absorbs
        non-reading streams and up to ``K`` steps of over-reading by a corrupt payload."""
        host = np.empty(self.wbuf_len, dtype=np.int32)
        host[0] = 0
        host[1 + self.w_tot:] = 0
        for g, it in enumerate(self.its):
            host[1 + self.wst[g]: 1 + self.wst[g + 1]] = it["words"]
        return torch.from_numpy(host).to(self.dev)

    def _host(self, arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=self.dev, dtype=dtype)

    def run(self) -> list[torch.Tensor]:
        """Decode every item; returns ordinary (non-inference) uint8 tensors of ``S * N``.

        The items of a run of equal shapes share one ``(items, S, N)`` allocation (each output
        is a view of its slice), so one copy per run moves a staging block to the outputs.
        """
        grid = [torch.empty((g1 - g0, self.its[g0]["S"], self.its[g0]["N"]), dtype=torch.uint8, device=self.dev)
                for g0, g1 in self.all_runs]
        # inference mode skips autograd dispatch and version counters: ~30% less fixed cost
        # per op. The outputs above are allocated outside it, so callers get normal tensors.
        with torch.inference_mode():
            self._loop(grid)
        return [blk[k].view(-1) for blk in grid for k in range(blk.shape[0])]

    def _loop(self, grid: list[torch.Tensor]) -> None:
        its, dev, G, K, cols = self.its, self.dev, self.G, self.K, self.cols
        i32, ix = dict(dtype=torch.int32, device=dev), dict(dtype=self.idx_dtype, device=dev)
        tabs = [_tables(it["f"]) for it in its]
        symtab = self._host(np.concatenate([t[0] for t in tabs]), torch.uint8)
        fctab = self._host(np.concatenate([t[1] for t in tabs]), torch.int32)
        wbuf = self._words()
        x = self._host(np.concatenate([it["states"] for it in its]).astype(np.int32), torch.int32)
        gid_np = np.repeat(np.arange(G, dtype=np.int64), np.diff(cols))
        gid = self._host(gid_np, self.idx_dtype)
        tof = self._host(gid_np * M, torch.int32)  # item offset into symtab
        gof = self._host(gid_np * 256, torch.int32)  # item offset into fctab
        base = self._host(self.wst[:-1], self.idx_dtype)  # per item: position of last word read
        bounds = self._host(cols, torch.int64)
        c = {k: torch.tensor(v, **i32) for k, v in
             dict(mask=M - 1, p=PROB_BITS, lo=STATE_LO, s31=31, park=1 << 30).items()}
        x_end = torch.empty_like(x)
        stage = torch.empty((K, self.n_tot), dtype=torch.uint8, device=dev)
        # nc[0] = 0; nc[k+1] = -(number of reads in 0..k) over all active streams
        nc = torch.zeros(self.n_tot + 1, **ix)
        pbuf, dbuf, nbuf = torch.empty(self.n_tot, **ix), torch.empty(G, **ix), torch.empty(G + 1, **ix)
        b1, b2, b3 = (torch.empty(self.n_tot, **i32) for _ in range(3))
        views: dict[int, tuple[Any, ...]] = {}
        mask, p, lo_, s31 = c["mask"], c["p"], c["lo"], c["s31"]
        alpha, ends = (1 << WORD_BITS) - 1, self.ends
        t0 = 0
        def run_views(ga: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            """(bases as items x 1, -reads as items x N, positions as items x N) per active run."""
            out = []
            for g0, g1 in self.runs or ():
                if g0 >= ga:
                    break
                c0, c1, N = int(cols[g0]), int(cols[g1]), its[g0]["N"]
                out.append((dbuf[g0:g1, None], nc[1 + c0: 1 + c1].view(g1 - g0, N), pbuf[c0:c1].view(g1 - g0, N)))
            return out

        for t, a, ga in zip(range(self.s_max), self.act.tolist(), self.gact.tolist()):
            if a not in views:
                views[a] = (run_views(ga), x[:a], tof[:a], gof[:a], gid[:a], nc[1: a + 1], nc[a], base[:ga],
                            bounds[: ga + 1], pbuf[:a], dbuf[:ga], b1[:a], b2[:a], b3[:a], list(stage[:, :a].unbind(0)),
                            nbuf[: ga + 1], nbuf[:ga], nbuf[1: ga + 1])
            rv, xa, ta, go, gi, nca, nc_a, ba, bd, pa, da, v1, v2, v3, st, nb, nb_lo, nb_hi = views[a]
            slot = torch.bitwise_and(xa, mask, out=v1)
            idx = torch.bitwise_or(slot, ta, out=v2) if G > 1 else slot
            s = torch.index_select(symtab, 0, idx, out=st[t - t0])  # the decoded symbols
            e = torch.index_select(fctab, 0, torch.add(go, s, out=v2), out=v3)
            slot.add_(torch.bitwise_right_shift(e, p, out=v2))  # slot - cum
            e.bitwise_and_(mask)  # f
            xa.bitwise_right_shift_(p)
            torch.addcmul(slot, e, xa, out=xa)  # x = f * (x >> P) + slot - cum
            m = torch.sub(xa, lo_, out=v1).bitwise_right_shift_(s31)  # -1 where x < L
            torch.cumsum(m, 0, out=nca)
            if G > 1:  # per item: last word read + reads up to and including this stream
                torch.index_select(nc, 0, bd, out=nb)
                d = torch.add(ba, nb_lo, out=da)
                torch.sub(d, nb_hi, out=ba)
                if rv:  # few runs of equal-shape items: broadcast each run's bases
                    for d_run, nc_run, p_run in rv:
                        torch.sub(d_run, nc_run, out=p_run)
                    pos = pa
                else:
                    pos = torch.index_select(d, 0, gi, out=pa).sub_(nca)
            else:
                pos = torch.sub(ba, nca, out=pa)
                ba.sub_(nc_a)
            w = torch.index_select(wbuf, 0, pos, out=v2)
            # readers (x < L < 2**16) get x * 2**16 + w; the int32 product may wrap for the
            # others, whose m is 0, so it is discarded
            torch.addcmul(xa, m, torch.add(w, xa, alpha=alpha, out=v3), value=-1, out=xa)
            for lo, hi, park in ends.get(t, ()):
                x_end[lo:hi] = x[lo:hi]
                if park:
                    x[lo:hi] = c["park"]
            if t - t0 + 1 == K or t == self.s_max - 1:
                for (g0, g1), blk in zip(self.all_runs, grid):  # runs active at any step since t0
                    rows = min(t + 1, its[g0]["S"]) - t0
                    if rows <= 0:
                        break
                    c0, c1 = int(cols[g0]), int(cols[g1])
                    src = stage[:rows, c0:c1].view(rows, g1 - g0, its[g0]["N"]).transpose(0, 1)
                    blk[:, t0: t0 + rows].copy_(src)
                t0 = t + 1
                if int(base.max()) > self.w_tot:
                    raise ValueError("rANS streams read past the end of their words: corrupted "
                                     "payload or wrong freqs")
        self._check_ends(base, x_end)

    def _check_ends(self, base: torch.Tensor, x_end: torch.Tensor) -> None:
        """Every stream must end at ``x == L`` with its item's words consumed exactly."""
        bad_w = (base.cpu().numpy() != self.wst[1:]).tolist()
        bad = np.add.reduceat((x_end != STATE_LO).cpu().numpy().astype(np.int64), self.cols[:-1])
        for g, (nb, bw) in enumerate(zip(bad.tolist(), bad_w)):
            if nb or bw:
                lo, hi = int(self.cols[g]), int(self.cols[g + 1])
                raise ValueError(f"item {self.its[g]['i']}: {nb} of {hi - lo} rANS streams failed the "
                                 f"end-of-stream check (words consumed ok: {not bw}): corrupted payload or "
                                 "wrong freqs")


def rans_decode(
    payload: Any, meta: dict, freqs: np.ndarray, n_symbols: int,
    device: str | torch.device = "cpu", threads: int | None = 1,
) -> torch.Tensor:
    """Decode one item (see ``rans_decode_many``); returns a uint8 tensor of ``n_symbols``."""
    return rans_decode_many([(payload, meta, freqs, n_symbols)], device, threads)[0]
