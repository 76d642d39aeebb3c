"""SmolLM2-135M at a given number of bytes: fp32, NF4, HQQ, ours (uniform and sensitivity), byte-budget export.

    taskset -c 1 python scripts/bench_budget.py --part peers  --json /tmp/bb/peers.json
    taskset -c 1 python scripts/bench_budget.py --part ours   --json /tmp/bb/ours.json
    taskset -c 1 python scripts/bench_budget.py --part budget --run RUN_DIR --json /tmp/bb/budget.json
    python scripts/bench_budget.py --plot docs/img/budget_bytes_vs_ppl.png /tmp/bb/*.json

One table split in parts (each part is one process, well under 15 minutes on one core); every
part evaluates on the same windows: 40 x 256 tokens of the KJV held-out split and of the
``pydoc`` domain (``acip.eval.domains``), no BOS. Rows:

* ``peers``: fp32; bitsandbytes NF4 (NF4Config); HQQ 4/3/2-bit g64 (scale and zero as fp16).
* ``ours``: the entropy quantizer, uniform at lam 3.9 / 14.5 / 58, and
  ``allocation="sensitivity"`` at each of those lams (matched bytes; the empirical Fisher of
  ``--calib-windows`` windows of 128 tokens of the KJV *training* split).
* ``budget``: ``export_budget(run, size_mb=NF4's bytes / bits_per_param=3.0 / 2.5)`` with the
  calibrated cost model (the same calibration windows), cached in ``--cache``.

Stored bytes are counted from the saved files: every tensor under a target layer in the
safetensors that ``save_pretrained`` writes (plus the sha256 an entropy-coded layer keeps), or for
HQQ the packed weight, scale and zero written with safetensors. bits/param = bytes x 8 /
106,168,320 (the dense target layers). Time: quantize (or cost model + allocation + build).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_header  # noqa: E402

DOMAINS = ("kjv_heldout", "pydoc")
LAMS = (3.9, 14.5, 58.0)


def say(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", flush=True)


def windows(tok, n: int) -> dict[str, torch.Tensor]:
    import acip
    from acip.eval.domains import pydoc_texts

    _, held = acip.data.kjv_split()
    return {"kjv_heldout": acip.eval.token_windows(tok, held, 256, n),
            "pydoc": acip.eval.token_windows(tok, pydoc_texts(), 256, n)}


def calibration(tok, n: int) -> list[torch.Tensor]:
    """``n`` windows of 128 tokens of the KJV training split (never held-out text)."""
    import acip

    train, _ = acip.data.kjv_split()
    return [w[None] for w in acip.eval.token_windows(tok, train, 128, n)]


def target_names(model: nn.Module) -> list[str]:
    from acip.quant import target_linears

    names = set()
    for n in target_linears(model):
        names.add(n.rsplit(".", 1)[0] if n.endswith((".up", ".down")) else n)
    return sorted(names)


def saved_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of every tensor under ``names`` in the files ``save_pretrained`` writes (+ 32 per coded layer)."""
    from safetensors import safe_open

    from acip.quant.module import EntQuantLinear

    d = Path(tempfile.mkdtemp(prefix="bb_"))
    try:
        model.save_pretrained(d)
        prefixes = tuple(n + "." for n in names)
        total = 0
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    if k.startswith(prefixes):
                        t = fh.get_slice(k)
                        shape, dt = t.get_shape(), t.get_dtype()
                        n = 1
                        for s in shape:
                            n *= s
                        total += n * {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}[dt]
        return total + 32 * sum(isinstance(m, EntQuantLinear) for m in model.modules())
    finally:
        shutil.rmtree(d, ignore_errors=True)


def hqq_(model: nn.Module, nbits: int) -> tuple[nn.Module, int]:
    """HQQ g64 on every target linear (replaced by its de-quantized weight); bytes of its tensors saved."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from safetensors.torch import save_file

    from acip.quant import target_linears

    keep = {}
    for name, lin in target_linears(model).items():
        q = HQQLinear(lin, quant_config=BaseQuantizeConfig(nbits=nbits, group_size=64),
                      compute_dtype=torch.float32, device="cpu", del_orig=False)
        for k in ("scale", "zero"):  # stored as fp16
            q.meta[k] = q.meta[k].half().float()
            keep[f"{name}.{k}"] = q.meta[k].half().contiguous()
        keep[f"{name}.W_q"] = q.W_q.contiguous()
        with torch.no_grad():
            lin.weight.copy_(q.dequantize().reshape(lin.weight.shape))
    d = Path(tempfile.mkdtemp(prefix="bb_hqq_"))
    try:
        save_file(keep, str(d / "hqq.safetensors"))
        from safetensors import safe_open

        with safe_open(str(d / "hqq.safetensors"), "pt") as fh:
            stored = sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return model, stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("peers", "ours", "budget"))
    ap.add_argument("--run", default="outputs/2026-12-01/10-41-30")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--bits", type=float, nargs="*", default=[3.0, 2.5])
    ap.add_argument("--nf4-bytes", type=int, default=None, help="budget: NF4's stored bytes (else measured here)")
    ap.add_argument("--lams", type=float, nargs="*", default=list(LAMS))
    ap.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    ap.add_argument("--refs", action="store_true", help="budget: the fp32 and NF4 rows too (same process)")
    ap.add_argument("--cache", default="/tmp/bb/budget_cost.safetensors")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", nargs="+", default=None, metavar=("PNG", "JSON"), help="PNG then part JSON files")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot[0], args.plot[1:])
    torch.set_num_threads(1)
    import acip
    from acip.quant import EntropyQuantConfig, NF4Config, quantize_

    header = machine_header(("transformers", "bitsandbytes", "hqq", "acip"))
    print(header, flush=True)
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    base, tok = acip.load_base("smollm2-135m")
    base.eval()
    wins = windows(tok, args.windows)
    names = target_names(base)
    dense = sum(base.get_submodule(n).weight.numel() for n in names)
    calib = calibration(tok, args.calib_windows)
    rows: list[dict] = []
    out = {"header": header, "command": " ".join(sys.argv), "dense_params": dense, "rows": rows,
           "calib": f"{args.calib_windows} x 128 tokens of the KJV training split"}

    def record(method: str, model: nn.Module, seconds: float, nbytes: int, **extra) -> None:
        ppl = {d: float(acip.eval.perplexity(model, tok, w, progress=False)) for d, w in wins.items()}
        rows.append({"method": method, "bytes": int(nbytes), "bits": 8 * nbytes / dense, "seconds": seconds,
                     "ppl": ppl, **extra})
        say(f"{method}: {nbytes} B ({8 * nbytes / dense:.3f} bits), {seconds:.1f}s, "
            + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    def want(name: str) -> bool:
        return name not in args.skip

    if args.part == "peers" or (args.part == "budget" and args.refs):
        if want("fp32"):
            record("fp32", base, 0.0, 4 * dense)
        if want("nf4"):
            t = time.perf_counter()
            m = quantize_(copy.deepcopy(base), NF4Config())
            sec = time.perf_counter() - t
            record("bitsandbytes NF4", m, sec, saved_bytes(m, names))
            del m
        for b in (4, 3, 2):
            if not want(f"hqq{b}") or args.part != "peers":
                continue
            try:
                t = time.perf_counter()
                m, stored = hqq_(copy.deepcopy(base), b)
                record(f"HQQ {b}-bit g64", m, time.perf_counter() - t, stored)
                del m
            except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported
                say(f"HQQ {b}-bit did not run: {type(e).__name__}: {e}")
                rows.append({"method": f"HQQ {b}-bit g64", "error": f"{type(e).__name__}: {e}"})
    if args.part == "ours":
        for lam in args.lams:
            for alloc in ("uniform", "sensitivity"):
                if not want(f"{alloc}{lam:g}"):
                    continue
                cfg = EntropyQuantConfig(lam=lam, allocation=alloc)
                t = time.perf_counter()
                m = quantize_(copy.deepcopy(base), cfg, calib=calib if alloc == "sensitivity" else None)
                sec = time.perf_counter() - t
                label = f"ours lam={lam:g}" + (" (sensitivity, matched bytes)" if alloc == "sensitivity" else " (uniform)")
                extra = {}
                if alloc == "sensitivity":
                    ll = m.config.acip_quant["layer_lam"]
                    extra["layer_lam"] = ll
                record(label, m, sec, saved_bytes(m, names), **extra)
                del m
    if args.part == "budget":
        from acip.export.budget import CostModel, allocate, export_budget

        src = Path(args.run)
        t = time.perf_counter()
        pm = acip.ACIPModel.from_pretrained(src, model=copy.deepcopy(base))  # reads the run directory only
        say(f"loaded {src} in {time.perf_counter() - t:.0f}s ({pm.score_map.method} map)")
        nf4_bytes = args.nf4_bytes or next((r["bytes"] for r in rows if r["method"] == "bitsandbytes NF4"), None)
        if nf4_bytes is None:
            m = quantize_(copy.deepcopy(base), NF4Config())
            nf4_bytes = saved_bytes(m, names)
            del m
        budgets = [("budget export at NF4's bytes", {"size_mb": nf4_bytes / 1e6})] if want("budget_nf4") else []
        budgets += [(f"budget export at {b:g} bits/param", {"bits_per_param": b}) for b in args.bits]
        Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
        fresh = not Path(args.cache).is_file()

        def progress(line: str) -> None:
            if line.startswith("cost model: model.layers.") and int(line.split("(")[1].split("/")[0]) % 30:
                return
            if line.startswith("fisher: window") and int(line.split()[2].rstrip(",")) % 4:
                return
            say(line)

        for i, (label, kw) in enumerate(budgets):
            t = time.perf_counter()
            small = export_budget(pm, calib=calib, cache=args.cache, progress=progress, **kw)
            sec = time.perf_counter() - t
            info = small.config.acip_export["budget"]
            kinds: dict[str, int] = {}
            for r in info["layers"].values():
                kinds[r["storage"]] = kinds.get(r["storage"], 0) + 1
            stored = saved_bytes(small, list(info["layers"]))
            cm = CostModel.load(args.cache)
            t2 = time.perf_counter()
            allocate(cm, info["budget_bytes"])
            alloc_s = time.perf_counter() - t2
            record(label, small, sec, stored, budget=info["budget_bytes"], storage=kinds, builds=info["builds"],
                   cost_model_s=cm.meta.get("seconds") if (i == 0 and fresh) else 0.0,
                   fisher_s=cm.meta.get("fisher_seconds") if (i == 0 and fresh) else 0.0,
                   new_budget_s=alloc_s, predicted_damage=info["predicted_damage"],
                   ranks={n: r["rank"] for n, r in info["layers"].items()},
                   lams={n: r["storage"] for n, r in info["layers"].items()})
            del small
    print(table(out), flush=True)


def table(out: dict) -> str:
    ref = next((r for r in out["rows"] if r["method"] == "fp32"), None)
    lines = ["| method | stored bytes | bits/param | KJV held-out ppl | pydoc ppl | x fp32 (KJV / pydoc) | seconds |",
             "|---|---|---|---|---|---|---|"]
    fp = ref["ppl"] if ref else FP32_PPL
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | did not run: {r['error']} | | | | | |")
            continue
        p = r["ppl"]
        lines.append(f"| {r['method']} | {r['bytes']:,} | {r['bits']:.3f} | {p['kjv_heldout']:.2f} | {p['pydoc']:.2f} | "
                     f"{p['kjv_heldout'] / fp['kjv_heldout']:.3f} / {p['pydoc'] / fp['pydoc']:.3f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


FP32_PPL = {"kjv_heldout": float("nan"), "pydoc": float("nan")}


def plot(png: str, files: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for f in files:
        rows += [r for r in json.loads(Path(f).read_text())["rows"] if "error" not in r]
    fp = next(r for r in rows if r["method"] == "fp32")
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6))
    style = {"fp32": ("k", "*"), "bitsandbytes": ("tab:blue", "s"), "HQQ": ("tab:orange", "^"),
             "(uniform)": ("tab:green", "o"), "(sensitivity": ("tab:red", "D"), "budget": ("tab:purple", "P")}

    def short(m: str) -> str:
        return (m.replace(" (sensitivity, matched bytes)", " sensitivity").replace("budget export at ", "budget at ")
                .replace("bitsandbytes ", "").replace(" (uniform)", " uniform"))

    handles = []
    for ax, dom, title in zip(axes, DOMAINS, ("KJV held-out", "pydoc")):
        for i, r in enumerate(rows, 1):  # a number at each point, the names in one legend: dense clusters stay legible
            c, mk = next((v for k, v in style.items() if k in r["method"]), ("gray", "x"))
            h = ax.scatter(r["bytes"] / 1e6, r["ppl"][dom], color=c, marker=mk, s=60, zorder=3,
                           label=f"{i}: {short(r['method'])}")
            if ax is axes[0]:
                handles.append(h)
            ax.annotate(str(i), (r["bytes"] / 1e6, r["ppl"][dom]), fontsize=7, textcoords="offset points",
                        xytext=(4, 3 if i % 2 else -9))
        ax.axhline(fp["ppl"][dom], color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stored bytes of the 210 target linears (MB, log)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"SmolLM2-135M, {title} (40 x 256 tokens)")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
