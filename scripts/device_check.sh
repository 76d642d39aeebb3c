#!/usr/bin/env bash
# The GPU check of the large-model path (issue 11, item 7): one run, one table, < 8 minutes on one
# H100/H200-class GPU. Run from anywhere: bash scripts/device_check.sh
#
# Rows: parametrize SmolLM2-135M (bf16, SVD in fp32) on cuda; step time of the parametrized model
# (masks trainable) against the dense model's forward+backward, tokens/s, peak GPU memory; export
# time at ratio 0.5; the rANS decoder (acip.quant.rans) on cuda against the CPU, M symbols/s.
# Without a CUDA device it stops at once: exit 2 and one line on stderr.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
source scripts/env.sh || { echo "device_check: scripts/env.sh failed (no venv?)" >&2; exit 1; }
python - <<'EOF' || exit $?
import sys
import torch
if not torch.cuda.is_available():
    build = torch.version.cuda or "a CPU-only build"
    print(f"device_check: no CUDA device (torch {torch.__version__}, {build}); run it on a machine with an "
          f"NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
    sys.exit(2)
EOF
exec timeout 470 python - "$@" <<'EOF'
import os, sys, time, statistics
import numpy as np
import torch

sys.path.insert(0, "scripts")
from machine import machine_header
import acip
from acip.core.parametrize import parametrize
from acip.quant import rans

dev = torch.device("cuda")
rows = []
def row(what, value, note=""):
    rows.append(f"| {what} | {value} | {note} |")

def sync():
    torch.cuda.synchronize()

t0 = time.perf_counter()
base, _ = acip.load_base("smollm2-135m", dtype=torch.bfloat16)  # on the host
dense, _ = acip.load_base("smollm2-135m", dtype=torch.bfloat16)
t_load = time.perf_counter() - t0
torch.cuda.reset_peak_memory_stats()
sync(); t0 = time.perf_counter()
pm = parametrize(base, svd_dtype="float32", device=dev)
sync(); t_param = time.perf_counter() - t0
peak_param = torch.cuda.max_memory_allocated() / 2**20
row("load SmolLM2 twice (host, bf16)", f"{t_load:.1f} s")
row("parametrize on cuda (210 layers, SVD fp32, factors bf16)", f"{t_param:.2f} s", f"peak GPU {peak_param:.0f} MiB")
assert all(l.base.device.type == "cuda" and l.base.dtype == torch.bfloat16 for l in pm.svd_layers().values())

B, T, steps = 8, 512, 10
ids = torch.randint(0, 49152, (B, T), generator=torch.Generator().manual_seed(0)).to(dev)
dense = dense.to(dev).train()
for p in dense.parameters():
    p.requires_grad_(True)
pm = pm.train()

def step(m, params):
    for p in params:
        p.grad = None
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss

res = {}
for name, m, params in (("dense", dense, list(dense.parameters())), ("acip", pm, pm.mask_parameters())):
    for _ in range(3):
        step(m, params)
    sync()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter(); step(m, params); sync(); times.append(time.perf_counter() - t0)
    res[name] = (statistics.median(times), torch.cuda.max_memory_allocated() / 2**20)
for name in ("dense", "acip"):
    t, mem = res[name]
    label = "dense bf16 fwd+bwd (all weights trainable)" if name == "dense" else "parametrized bf16 fwd+bwd (masks trainable)"
    row(label, f"{t * 1000:.1f} ms", f"{B * T / t:.0f} tokens/s, peak GPU {mem:.0f} MiB, batch {B} x {T}, median of {steps}")
row("parametrized / dense step time", f"{res['acip'][0] / res['dense'][0]:.2f}")
del dense

pm.eval()
sm = acip.ScoreMap.from_singular_values(pm)
sync(); t0 = time.perf_counter()
e = acip.export(pm, 0.5, score_map=sm)
sync(); t_exp = time.perf_counter() - t0
with torch.no_grad():
    logits = e(input_ids=ids[:1, :64]).logits
assert torch.isfinite(logits.float()).all()
row("export at ratio 0.5 (on cuda)", f"{t_exp:.2f} s", f"{sum(p.numel() for p in e.parameters()) / 1e6:.1f}M params, {next(e.parameters()).device}")
del e, pm

g = torch.Generator().manual_seed(0)
w = torch.randn(8192, 4096, generator=g)
codes = (w / 2.0**torch.round(torch.log2(w.std(dim=1, keepdim=True) / 2.0**-8))).to(torch.float8_e4m3fn)
codes = codes.view(torch.uint8).reshape(-1).numpy()
freqs = rans.quantize_freqs(np.bincount(codes, minlength=256))
payload, meta = rans.rans_encode(codes, freqs)
items = [(payload, meta, freqs, codes.size)]
for where in ("cpu", "cuda"):
    rans.rans_decode_many(items, device=where)  # warm-up
    if where == "cuda":
        sync()
    t0 = time.perf_counter()
    out = rans.rans_decode_many(items, device=where)
    if where == "cuda":
        sync()
    t = time.perf_counter() - t0
    assert np.array_equal(out[0].cpu().numpy(), codes), f"rANS on {where} is not bit-exact"
    row(f"rANS decode on {where} ({codes.size / 1e6:.1f}M codes, {meta['n_streams']} streams)", f"{codes.size / t / 1e6:.1f} M symbols/s", "bit-exact")

print(machine_header() + f"\ngpu: {torch.cuda.get_device_name(0)}, torch cuda {torch.version.cuda}\n")
print("| check | value | notes |")
print("|---|---|---|")
print("\n".join(rows))
EOF
