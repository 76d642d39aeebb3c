"""Byte-budget export on SmolLM2-135M: KJV held-out perplexity at NF4's bytes and at 3.0 bits/param.

    taskset -c 1 python scripts/bench_budget.py [--run RUN_DIR] [--calib-windows 4] [--json out.json]

The run directory defaults to the newest ``outputs/*/*/acip_state.safetensors``; without one the
singular-value map of the plain parametrization is used. Rows: fp32, bitsandbytes NF4 (whole
target layers), and ``acip.export(run, size_mb=<NF4's target bytes>)`` / ``bits_per_param=3.0``
(cost model calibrated on ``--calib-windows`` windows of 128 tokens of the KJV training split;
0 = data-free). Stored bytes are those of the target layers (``acip.export.budget.target_bytes``,
the count ``acip.quant.report`` makes); 40 held-out windows of 256 tokens, no BOS.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--bits", type=float, nargs="*", default=[3.0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import acip
    from acip.export.budget import export_budget, target_bytes
    from acip.quant import quantize_, report

    t0 = time.perf_counter()
    base, tok = acip.load_base("smollm2-135m")
    runs = sorted(glob.glob("outputs/*/*/acip_state.safetensors"), key=os.path.getmtime, reverse=True)
    run = args.run or (os.path.dirname(runs[0]) if runs else None)
    if run:
        pm = acip.ACIPModel.from_pretrained(run, model=copy.deepcopy(base))
        source, label = pm, f"run {run} ({pm.score_map.method} map)"
    else:
        pm = acip.parametrize(copy.deepcopy(base))
        pm.score_map = acip.ScoreMap.from_singular_values(pm)
        source, label = pm, "singular-value map"
    print(f"[bench] {label}, loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    train, held = acip.data.kjv_split()
    win = acip.eval.token_windows(tok, held, 256, 40)
    calib = ([w[None] for w in acip.eval.token_windows(tok, train, 128, args.calib_windows)]
             if args.calib_windows else None)
    names = list(pm.svd_layers())
    dense = sum(l.in_features * l.out_features for l in pm.svd_layers().values())

    def ppl(m) -> float:
        return float(acip.eval.perplexity(m, tok, win, progress=False))

    def say(line: str) -> None:  # every 30th layer of the cost model, everything else
        if line.startswith("cost model: model.layers.") and int(line.split("(")[1].split("/")[0]) % 30:
            return
        print(f"[bench]   {line}", flush=True)

    rows = []
    rows.append({"method": "fp32", "bytes": 4 * dense, "ppl": ppl(base), "seconds": 0.0})
    print(f"[bench] {rows[-1]}", flush=True)
    t = time.perf_counter()
    nf4 = quantize_(copy.deepcopy(base), "nf4")
    nf4_s = time.perf_counter() - t
    nf4_bytes = sum(r.coded_bytes for r in report(nf4).rows)
    rows.append({"method": "bitsandbytes NF4", "bytes": nf4_bytes, "ppl": ppl(nf4), "seconds": nf4_s})
    print(f"[bench] {rows[-1]}", flush=True)
    del nf4
    budgets = [("budget export at NF4's bytes", {"size_mb": nf4_bytes / 1e6})]
    budgets += [(f"budget export at {b:g} bits/param", {"bits_per_param": b}) for b in args.bits]
    for name, kw in budgets:
        t = time.perf_counter()
        small = export_budget(source, calib=calib, progress=say, **kw)
        sec = time.perf_counter() - t
        info = small.config.acip_export["budget"]
        stored = sum(target_bytes(small, names).values())
        kinds: dict[str, int] = {}
        for r in info["layers"].values():
            kinds[r["storage"]] = kinds.get(r["storage"], 0) + 1
        rows.append({"method": name, "bytes": stored, "budget": info["budget_bytes"], "ppl": ppl(small),
                     "seconds": sec, "storage": kinds, "builds": info["builds"],
                     "kept_params": sum(min(r["rank"] * (o + i), o * i) for r, (o, i) in
                                        zip([v["rank"] for v in info["layers"].values()],
                                            [(l.out_features, l.in_features) for l in pm.svd_layers().values()]))})
        print(f"[bench] {rows[-1]}", flush=True)
        del small
    print(f"\n{label}; target-layer dense params {dense}\n")
    print("| method | target-layer bytes | bits/param | KJV ppl | x fp32 | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bytes']} | {8 * r['bytes'] / dense:.3f} | {r['ppl']:.2f} | "
              f"{r['ppl'] / rows[0]['ppl']:.3f} | {r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": label, "dense_params": dense, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
