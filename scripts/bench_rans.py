"""Benchmark: our interleaved rANS (acip.quant.rans) vs constriction, side by side in one run.

Cases
  (a) synthetic float8_e4m3 codes of one Gaussian matrix, ~3.3 bits of entropy per code;
  (b) SmolLM2-135M scale: the 211 weight matrices of SmolLM2-135M (30 layers of q,k,v,o,gate,up,
      down + the tied embedding, 134.5M codes), each with its own histogram. The codes are
      synthesised (heavy-tailed weights, per-row power-of-two scales, float8_e4m3 codes at
      ~2.5-3.5 bits), not produced by the quantizer. Ours decodes all tensors in one lockstep
      run (``rans_decode_many``); constriction decodes tensor by tensor.
  (c) one decoder block of (b) (layer 0: q,k,v,o,gate,up,down; 3.5M codes), what the lazy
      decode mode decodes in one pass with ``cache_layers=7``;
  (d) one 1536 x 576 matrix of (b) (0.9M codes, 216 streams), a lazy pass with one layer.

Usage: python scripts/bench_rans.py [--case a|b|c|d, any combination] [--repeat 2] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np
import torch

from machine import machine_header  # scripts/machine.py
from acip.quant import rans
from rans_ref import constriction_decode, constriction_encode, ideal_bits  # scripts/rans_ref.py

TABLE_BYTES = 2 * 256  # per tensor: 256 uint16 frequencies (both codecs need one)


def machine() -> str:
    return (f"{machine_header(('numpy', 'constriction', 'acip'))}\n"
            f"load average {os.getloadavg()}, PROB_BITS {rans.PROB_BITS}, "
            f"SYMBOLS_PER_STREAM {rans.SYMBOLS_PER_STREAM}")


def fp8_codes(w: torch.Tensor, target_std: float) -> np.ndarray:
    """Per-row power-of-two scales so each row's std is ~target_std, then float8_e4m3 codes."""
    t = torch.round(torch.log2(w.std(dim=1, keepdim=True) / target_std))
    return (w / 2.0**t).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1).numpy()


def case_a(n: int) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(0)
    return [fp8_codes(torch.randn(n // 4096, 4096, generator=g), 2.0**-8)]


def smollm2_shapes() -> list[tuple[int, int]]:
    h, i, kv = 576, 1536, 192
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    return [(49152, h)] + layer * 30


def case_b() -> list[np.ndarray]:
    g = torch.Generator().manual_seed(1)
    out = []
    for k, (r, c) in enumerate(smollm2_shapes()):
        w = torch.randn(r, c, generator=g)
        w = w * torch.rand(r, c, generator=g).pow(2).mul(2).add(0.3)  # heavier tails
        w = w * torch.randn(r, 1, generator=g).mul(0.3).exp()  # row scale spread
        out.append(fp8_codes(w, 2.0 ** (-8.5 + (k % 7) * 0.15)))
    return out


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float, list[float], object]:
    """Best wall time, best process CPU time (robust to other processes), all wall times."""
    walls, cpus, res = [], [], None
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        res = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), walls, res


def bench(name: str, tensors: list[np.ndarray], repeat: int, threads: list[int]) -> list[str]:
    n = sum(t.size for t in tensors)
    hists = [np.bincount(t, minlength=256) for t in tensors]
    h_bits = sum(ideal_bits(h) for h in hists)
    rows = []

    def row(codec: str, nbytes: int, enc_s: float, dec: tuple) -> str:
        bps = nbytes * 8 / n
        wall, cpu, walls = dec[:3]
        return (f"| {codec} | {name} | {n / 1e6:.1f}M | {bps:.4f} | {h_bits / n:.4f} | "
                f"{(bps / (h_bits / n) - 1) * 100:+.3f}% | {n / enc_s / 1e6:.0f} | "
                f"{n / wall / 1e6:.1f} | {n / cpu / 1e6:.1f} | "
                f"{wall:.2f} ({', '.join(f'{t:.2f}' for t in walls)}) |")

    # constriction: per tensor, reference codec and oracle
    t = time.perf_counter()
    ref = [constriction_encode(s, h) for s, h in zip(tensors, hists)]
    enc_c = time.perf_counter() - t
    dec_c = timed(
        lambda: [constriction_decode(r, h, s.size) for r, s, h in zip(ref, tensors, hists)],
        repeat)
    out_c = dec_c[3]
    assert all(np.array_equal(o, s) for o, s in zip(out_c, tensors)), "constriction mismatch"
    rows.append(row("constriction 0.5 (1 thread, GIL)",
                    sum(r.nbytes for r in ref) + TABLE_BYTES * len(tensors), enc_c, dec_c))
    # ours: encode per tensor, decode everything in one lockstep run
    t = time.perf_counter()
    freqs = [rans.quantize_freqs(h) for h in hists]
    enc = rans.rans_encode_many([(s, f, None) for s, f in zip(tensors, freqs)])
    enc_o = time.perf_counter() - t
    items = [(p, m, f, s.size) for (p, m), f, s in zip(enc, freqs, tensors)]
    size = sum(p.size for p, _ in enc) + TABLE_BYTES * len(tensors)
    streams = sum(m["n_streams"] for _, m in enc)
    for th in threads:
        dec_o = timed(lambda: rans.rans_decode_many(items, threads=th), repeat)
        out_o = dec_o[3]
        assert all(np.array_equal(o.numpy(), s) for o, s in zip(out_o, tensors)), "rANS mismatch"
        assert all(np.array_equal(o.numpy(), c) for o, c in zip(out_o, out_c)), "differs from ref"
        rows.append(row(f"ours rANS torch ({th} thread{'s' * (th > 1)}, {streams} streams)",
                        size, enc_o, dec_o))
    return rows


def sweep(tensors: list[np.ndarray], repeat: int) -> list[str]:
    """Stream length trade-off: per-stream state cost vs lockstep width."""
    n = sum(t.size for t in tensors)
    h_bits = sum(ideal_bits(np.bincount(t, minlength=256)) for t in tensors)
    rows, keep = [], rans.SYMBOLS_PER_STREAM  # module default, read by rans_encode
    for sps in (1024, 2048, 4096, 8192, 16384):
        rans.SYMBOLS_PER_STREAM = sps
        freqs = [rans.quantize_freqs(np.bincount(t, minlength=256)) for t in tensors]
        enc = rans.rans_encode_many([(s, f, None) for s, f in zip(tensors, freqs)])
        items = [(p, m, f, s.size) for (p, m), f, s in zip(enc, freqs, tensors)]
        dec, cpu, all_t, _ = timed(lambda: rans.rans_decode_many(items), repeat)
        size = sum(p.size for p, _ in enc) + TABLE_BYTES * len(tensors)
        rows.append(f"| {sps} | {sum(m['n_streams'] for _, m in enc)} | "
                    f"{(size * 8 / h_bits - 1) * 100:+.3f}% | {n / dec / 1e6:.1f} | "
                    f"{n / cpu / 1e6:.1f} | "
                    f"{', '.join(f'{t:.2f}' for t in all_t)} |")
    rans.SYMBOLS_PER_STREAM = keep
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="ab", help="any of a, b, c, d (e.g. abcd)")
    ap.add_argument("--n-a", type=float, default=2**25, help="symbols in case (a)")
    ap.add_argument("--repeat", type=int, default=2, help="decode repetitions (best is shown)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts for our decoder")
    ap.add_argument("--sweep", action="store_true", help="stream-length trade-off on case (b)")
    args = ap.parse_args()
    print(machine())
    threads = [int(t) for t in args.threads.split(",")]
    head = ("| codec | case | symbols | bits/symbol | entropy | overhead | encode MB/s | "
            "decode M sym/s wall (best) | decode M sym/s CPU time (best) | "
            "decode wall s: best (all runs) |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    if "a" in args.case:
        rows += bench("(a) fp8 Gaussian codes", case_a(int(args.n_a)), args.repeat, threads)
    if any(k in args.case for k in "bcd") or args.sweep:
        tb = case_b()
        if "b" in args.case:
            rows += bench("(b) SmolLM2-scale, 211 tensors", tb, args.repeat, threads)
        if "c" in args.case:
            rows += bench("(c) one block of (b), 7 tensors", tb[1:8], args.repeat, threads)
        if "d" in args.case:
            rows += bench("(d) one 1536x576 tensor of (b)", tb[5:6], args.repeat, threads)
    print(head)
    print("\n".join(rows))
    if args.sweep:
        print("\nStream length sweep on (b), 1 thread "
              "(overhead = bytes vs entropy, incl. tables):")
        print("| symbols/stream | streams | overhead | decode M sym/s wall | M sym/s CPU | "
              "decode s (all runs) |\n|---|---|---|---|---|---|")
        print("\n".join(sweep(tb, args.repeat)))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
