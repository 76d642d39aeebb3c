"""SmolLM2-135M at a given number of bytes: fp32, NF4, HQQ, ours (uniform and sensitivity), byte-budget export.

    taskset -c 1 python scripts/bench_budget.py --part peers  --json /tmp/bb/peers.json
    taskset -c 1 python scripts/bench_budget.py --part ours   --json /tmp/bb/ours.json
    taskset -c 1 python scripts/bench_budget.py --part budget --run RUN_DIR --json /tmp/bb/budget.json
    taskset -c 1 python scripts/bench_budget.py --part grid   --run RUN_DIR --json /tmp/bb/grid.json
    taskset -c 1 python scripts/bench_budget.py --part gptq   --gptq-python /work/gptq-venv/bin/python --json /tmp/bb/gptq.json
    python scripts/bench_budget.py --table /tmp/bb/*.json
    python scripts/bench_budget.py --plot docs/img/budget_bytes_vs_ppl.png /tmp/bb/*.json

One table split in parts (each part is one process, well under 15 minutes on one core); every
part evaluates on the same windows: 40 x 256 tokens of the KJV held-out split and of the
``pydoc`` domain (``acip.eval.domains``), no BOS. Rows:

* ``peers``: fp32; bitsandbytes NF4 (NF4Config); HQQ 4/3/2-bit g64 (scale and zero as fp16).
* ``ours``: the entropy quantizer, uniform at lam 3.9 / 14.5 / 58, and
  ``allocation="sensitivity"`` at each of those lams (matched bytes; the empirical Fisher of
  ``--calib-windows`` windows of 128 tokens of the KJV *training* split).
* ``ours --fmt uniform``: the same rows with ``fmt="uniform"`` (ECSQ), each next to its
  ``rounding="gptq"`` twin (GPTQ error feedback; Grams from ``--gptq-calib-windows`` windows of 128
  tokens of the KJV training split, the GPTQ peer's calibration text); ``--skip uniform13.4:gptq``
  leaves one out.
* ``budget``: ``export_budget(run, size_mb=NF4's bytes / bits_per_param=3.0 / 2.5)`` with the
  calibrated cost model (the same calibration windows), cached in ``--cache``; ``--refs`` and
  ``--uniform-lams`` add fp32, NF4 and ours uniform to the same process; ``--fmt uniform
  [--rounding gptq]`` stores the quantized layers as ECSQ (with GPTQ codes: Fisher and Grams from
  the ``--gptq-calib-windows``).
* ``grid``: ``acip.export(run, ratio=r)`` (``adapters="auto"``) then ours uniform at ``lam``, for
  every ``--ratios`` x ``--grid-lams`` point (``--skip grid0.7:58`` leaves one out). ``--table``
  then names the best grid point at NF4's bytes and at each ``--bits`` (stored bytes <= budget).
* ``gptq`` (opt-in, never in CI): GPTQ W4 / W3 g64 (g128 is refused: 576 columns) through ``llmcompressor`` in a venv of its own
  (``--gptq-python``; ``scripts/gptq_peer.py`` sets it up and runs there), calibrated on
  ``--gptq-calib`` windows of the KJV *training* split; its de-quantized weights are evaluated
  here, its bytes counted from its compressed checkpoint.

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
from budget_table import combined_table, plot, table  # noqa: E402
from machine import machine_header  # noqa: E402

LAMS = (3.9, 14.5, 58.0)
RATIOS = (1.0, 0.9, 0.8, 0.7)


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


def selfgen_mix_calibration(tok, n: int) -> list[torch.Tensor]:
    """``n`` windows of 128 tokens of the README main job's training data: a quarter KJV *training*
    windows, three quarters the model's own chat-turn samples (the ``data=mix`` default's
    ``self_generated`` component with its settings, read from the acip cache or sampled once; its
    training rows only, never its validation rows)."""
    from omegaconf import OmegaConf

    from acip.train.sources import self_generated

    comp = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf/data/mix.yaml").components.self_generated.data
    kw = {k: v for k, v in OmegaConf.to_container(comp).items() if k not in ("_target_", "model", "seed")}
    model = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf/model/smollm2_135m.yaml"))
    train, _ = self_generated(model, seed=0, **kw)
    n_kjv = n // 4
    rows = train.tokens[: n - n_kjv, :128]
    return calibration(tok, n_kjv) + [r[None] for r in rows]


def target_names(model: nn.Module) -> list[str]:
    from acip.quant import target_linears

    names = set()
    for n in target_linears(model):
        names.add(n.rsplit(".", 1)[0] if n.endswith((".up", ".down")) else n)
    return sorted(names)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "I16": 2,
                "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}


def file_bytes(directory: str | Path, names: list[str]) -> int:
    """Bytes of every tensor under ``names`` (a dotted layer name, then ``.``) in ``directory``'s safetensors.

    Used for every row whose model is written to files (ours, NF4, the budget export, the grid, GPTQ);
    imports only ``safetensors``, so ``scripts/gptq_peer.py`` counts with it in its own venv."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {str(directory)!r}: save the model there first")
    if not names:
        raise ValueError("names is empty: pass the dotted names of the target layers to count")
    prefixes = tuple(n + "." for n in names)
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if k.startswith(prefixes):
                    t = fh.get_slice(k)
                    n = 1
                    for s in t.get_shape():
                        n *= s
                    dt = t.get_dtype()
                    if dt not in _DTYPE_BYTES:
                        raise ValueError(f"tensor {k!r} in {f.name} has dtype {dt!r}, not one of {sorted(_DTYPE_BYTES)}")
                    total += n * _DTYPE_BYTES[dt]
    return total


def saved_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of every tensor under ``names`` in the files ``save_pretrained`` writes (+ 32 per coded layer)."""
    from acip.quant.module import EntQuantLinear

    d = Path(tempfile.mkdtemp(prefix="bb_"))
    try:
        model.save_pretrained(d)
        return file_bytes(d, names) + 32 * sum(isinstance(m, EntQuantLinear) for m in model.modules())
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
        stored = file_bytes(d, list(target_linears(model)))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return model, stored


def grid_rows(pm, ratios: list[float], lams: list[float], want, record) -> None:
    """The ACIP-ratio x lam grid: for each ratio ``r`` one ``acip.export(pm, ratio=r)`` (``adapters="auto"``,
    the export default), then ours uniform at each ``lam`` on a copy; ``record(method, model, seconds,
    bytes, **extra)`` gets every point (bytes from the saved files). ``want(f"grid{r:g}:{lam:g}")``
    false leaves a point out."""
    import acip
    from acip.core import check_ratio
    from acip.quant import EntropyQuantConfig, quantize_

    if not ratios or not lams:
        raise ValueError(f"the grid needs at least one ratio and one lam, got ratios={ratios!r}, lams={lams!r}")
    for r in ratios:
        check_ratio(r)
        todo = [lam for lam in lams if want(f"grid{r:g}:{lam:g}")]
        if not todo:
            continue
        t = time.perf_counter()
        small = acip.export(pm, ratio=r)
        export_s = time.perf_counter() - t
        names = target_names(small)
        for lam in todo:
            t = time.perf_counter()
            m = quantize_(copy.deepcopy(small), EntropyQuantConfig(lam=lam))
            sec = export_s + time.perf_counter() - t
            record(f"grid ratio={r:g} lam={lam:g}", m, sec, saved_bytes(m, names), ratio=r, lam=lam,
                   size_ratio=float(acip.size_ratio(small)), adapters=small.config.acip_export.get("adapters"),
                   export_s=export_s)
            del m
        del small


def gptq_rows(args: argparse.Namespace, base: nn.Module, tok, names: list[str], record) -> None:
    """GPTQ rows: scripts/gptq_peer.py in the ``--gptq-python`` venv, its de-quantized weights evaluated here."""
    import acip
    from safetensors.torch import load_file, save_file

    from gptq_peer import run as gptq_run

    work = Path(args.gptq_work)
    (work / "base").mkdir(parents=True, exist_ok=True)
    base.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    n, length = args.gptq_calib
    train, _ = acip.data.kjv_split()
    ids = acip.eval.token_windows(tok, train, length, n)  # the KJV *training* split, never held-out text
    if ids.shape[0] < n:
        raise SystemExit(f"--gptq-calib {n} {length}: the KJV training split has only {ids.shape[0]} such windows")
    save_file({"input_ids": ids.contiguous()}, str(work / "calib.safetensors"))
    for bits in args.gptq_bits:
        label = f"GPTQ W{bits} g{args.gptq_group} (llmcompressor {args.gptq_version}, sym)"
        try:
            info = gptq_run(args.gptq_python, work / "base", work / "calib.safetensors", bits, args.gptq_group,
                            work / f"w{bits}g{args.gptq_group}")
        except RuntimeError as e:  # a peer that does not run here is reported with its error
            say(f"{label} did not run: {e}")
            record.error(label, str(e).splitlines()[0] + " | " + str(e).strip().splitlines()[-1])
            continue
        w = load_file(info.pop("weights"))
        want = {f"{nm}.weight" for nm in names}
        if set(w) != want:
            raise RuntimeError(f"GPTQ wrote weights for {len(w)} layers, expected the {len(want)} target layers; "
                               f"missing {sorted(want - set(w))[:3]}, extra {sorted(set(w) - want)[:3]}")
        m = copy.deepcopy(base)
        with torch.no_grad():
            for nm in names:
                m.get_submodule(nm).weight.copy_(w[f"{nm}.weight"])
        record(label, m, info["seconds"], info["bytes"], gptq=info)
        del m, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("peers", "ours", "budget", "grid", "gptq"))
    ap.add_argument("--run", default="outputs/2026-12-01/10-41-30")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--bits", type=float, nargs="*", default=[3.0, 2.5])
    ap.add_argument("--nf4-bytes", type=int, default=None, help="budget: NF4's stored bytes (else measured here)")
    ap.add_argument("--lams", type=float, nargs="*", default=list(LAMS))
    ap.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    ap.add_argument("--fmt", choices=("e4m3", "uniform"), default="e4m3",
                    help="ours / budget: the entropy quantizer's code format; uniform adds the rounding='gptq' rows "
                         "(calibrated on the same --calib-windows) next to nearest rounding")
    ap.add_argument("--rounding", choices=("nearest", "gptq"), default="nearest",
                    help="budget with --fmt uniform: the codes' rounding (gptq: Fisher and Grams from the "
                         "--gptq-calib-windows)")
    ap.add_argument("--gptq-calib-text", choices=("kjv", "mix"), default="kjv",
                    help="fmt=uniform rounding=gptq: KJV training windows, or the main job's training mix (1/4 KJV, "
                         "3/4 the model's own chat-turn samples)")
    ap.add_argument("--gptq-calib-windows", type=int, default=64,
                    help="fmt=uniform rounding=gptq: windows of 128 tokens of the KJV training split for the Grams")
    ap.add_argument("--refs", action="store_true", help="budget: the fp32 and NF4 rows too (same process)")
    ap.add_argument("--uniform-lams", type=float, nargs="*", default=[],
                    help="budget: ours uniform at these lams too (same process)")
    ap.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS), help="grid: ACIP export ratios")
    ap.add_argument("--grid-lams", type=float, nargs="*", default=list(LAMS), help="grid: uniform lams")
    ap.add_argument("--gptq-python", default=None, help="gptq: the interpreter of the llmcompressor venv")
    ap.add_argument("--gptq-bits", type=int, nargs="*", default=[4, 3])
    ap.add_argument("--gptq-group", type=int, default=64,
                    help="gptq: group size (SmolLM2's 576 columns refuse 128 in llmcompressor 0.14)")
    ap.add_argument("--gptq-calib", type=int, nargs=2, default=[64, 256], metavar=("WINDOWS", "LEN"),
                    help="gptq: calibration windows of the KJV training split")
    ap.add_argument("--gptq-work", default="/tmp/bb/gptq", help="gptq: base model, calibration and outputs")
    ap.add_argument("--cache", default="/tmp/bb/budget_cost.safetensors")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", nargs="+", default=None, metavar=("PNG", "JSON"), help="PNG then part JSON files")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="print one table of these part JSON files, with the best grid point at each budget")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot[0], args.plot[1:])
    if args.table:
        return print(combined_table(args.table, args.bits))
    if args.part is None:
        ap.error("pass --part (or --plot / --table)")
    if args.part == "gptq":  # fail before loading anything when the peer's venv is missing
        from gptq_peer import GPTQUnavailable, check_python

        if not args.gptq_python:
            ap.error("--part gptq needs --gptq-python PATH (the llmcompressor venv's python; scripts/gptq_peer.py)")
        try:
            args.gptq_version = check_python(args.gptq_python)
        except GPTQUnavailable as e:
            raise SystemExit(f"--part gptq: {e}") from None
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
    gcalib = None
    if args.fmt == "uniform":
        gcalib = (selfgen_mix_calibration if args.gptq_calib_text == "mix" else calibration)(tok, args.gptq_calib_windows)
    rows: list[dict] = []
    out = {"header": header, "command": " ".join(sys.argv), "dense_params": dense, "rows": rows,
           "calib": f"{args.calib_windows} x 128 tokens of the KJV training split"}

    def record(method: str, model: nn.Module, seconds: float, nbytes: int, **extra) -> None:
        ppl = {d: float(acip.eval.perplexity(model, tok, w, progress=False)) for d, w in wins.items()}
        rows.append({"method": method, "bytes": int(nbytes), "bits": 8 * nbytes / dense, "seconds": seconds,
                     "ppl": ppl, **extra})
        say(f"{method}: {nbytes} B ({8 * nbytes / dense:.3f} bits), {seconds:.1f}s, "
            + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()))
        dump()

    def dump() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    def error(method: str, text: str) -> None:
        rows.append({"method": method, "error": text})
        dump()

    record.error = error

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
                error(f"HQQ {b}-bit g64", f"{type(e).__name__}: {e}")
    def ours(lam: float, alloc: str, rounding: str = "nearest") -> None:
        cfg = EntropyQuantConfig(lam=lam, allocation=alloc, fmt=args.fmt, rounding=rounding)
        t = time.perf_counter()
        data_aware = alloc == "sensitivity" or rounding == "gptq"
        m = quantize_(copy.deepcopy(base), cfg, calib=(gcalib if rounding == "gptq" else calib) if data_aware else None)
        sec = time.perf_counter() - t
        label = f"ours lam={lam:g}" + (" (sensitivity, matched bytes)" if alloc == "sensitivity" else " (uniform)")
        if args.fmt != "e4m3":
            label += f" fmt={args.fmt}" + (", gptq rounding" if rounding == "gptq" else "")
            if rounding == "gptq" and args.gptq_calib_text != "kjv":
                label += f" (calibrated on the {args.gptq_calib_text})"
        extra = {"layer_lam": m.config.acip_quant["layer_lam"]} if alloc == "sensitivity" else {}
        record(label, m, sec, saved_bytes(m, names), **extra)

    if args.part == "ours":
        for lam in args.lams:
            for alloc in ("uniform", "sensitivity"):
                if want(f"{alloc}{lam:g}"):
                    ours(lam, alloc)
                if args.fmt == "uniform" and want(f"{alloc}{lam:g}:gptq"):
                    ours(lam, alloc, "gptq")
    if args.part == "budget":
        for lam in args.uniform_lams:
            ours(lam, "uniform")
    if args.part == "gptq":
        gptq_rows(args, base, tok, names, record)
    if args.part == "grid":
        src = Path(args.run)
        pm = acip.ACIPModel.from_pretrained(src, model=copy.deepcopy(base))  # reads the run directory only
        say(f"loaded {src} ({pm.score_map.method} map)")
        grid_rows(pm, args.ratios, args.grid_lams, want, record)
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
        if args.fmt != "e4m3":
            cal = f", calibrated on the {args.gptq_calib_text}" if args.rounding == "gptq" and args.gptq_calib_text != "kjv" else ""
            budgets = [(f"{label} (fmt={args.fmt}, {args.rounding}{cal})", kw) for label, kw in budgets]
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
            bq = EntropyQuantConfig(fmt=args.fmt, rounding=args.rounding)
            small = export_budget(pm, calib=gcalib if args.rounding == "gptq" else calib, cache=args.cache,
                                  progress=progress, quant=bq, **kw)
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


if __name__ == "__main__":
    main()
