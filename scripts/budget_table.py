"""The table and the bytes-vs-perplexity plot of scripts/bench_budget.py, from its part JSON files.

    python scripts/bench_budget.py --table /tmp/bb/*.json
    python scripts/bench_budget.py --plot docs/img/budget_bytes_vs_ppl.png /tmp/bb/*.json
"""
from __future__ import annotations

import json
from pathlib import Path

DOMAINS = ("kjv_heldout", "pydoc")


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


def budgets_of(rows: list[dict], dense: int, bits: list[float]) -> list[tuple[str, int]]:
    """``(name, bytes)`` of the table's byte counts: NF4's stored bytes (if a row has them), then ``bits``."""
    out = [("NF4's bytes", r["bytes"]) for r in rows if r.get("method") == "bitsandbytes NF4" and "bytes" in r][:1]
    return out + [(f"{b:g} bits/param", int(b * dense / 8)) for b in bits]


def grid_best(rows: list[dict], budget: int) -> list[dict]:
    """The best grid point with stored bytes <= ``budget``, per domain: one row if one point is best on
    every domain, else one row per domain (each the whole row of its point). Empty if none fits."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")
    grid = [r for r in rows if r.get("method", "").startswith("grid ") and "error" not in r and r["bytes"] <= budget]
    if not grid:
        return []
    best = {d: min(grid, key=lambda r: r["ppl"][d]) for d in DOMAINS}
    if len({id(r) for r in best.values()}) == 1:
        return [dict(best[DOMAINS[0]], best_for="every domain")]
    return [dict(r, best_for=d) for d, r in best.items()]


def combined_table(files: list[str], bits: list[float]) -> str:
    """One table of part JSON files, then the best grid point at each byte count (:func:`grid_best`)."""
    rows, dense = [], None
    for f in files:
        data = json.loads(Path(f).read_text())
        rows += data["rows"]
        dense = dense or data.get("dense_params")
    if dense is None:
        raise ValueError(f"none of {files} has dense_params: pass JSON files that bench_budget.py --json wrote")
    extra = []
    for name, b in budgets_of(rows, dense, bits):
        got = grid_best(rows, b)
        if not got:
            extra.append({"method": f"best grid point at {name} ({b:,} B)", "error": "no grid point fits"})
        for r in got:
            extra.append(dict(r, method=f"best grid point at {name}, for {r['best_for']}: {r['method'][5:]}"))
    return table({"rows": rows + extra})


def plot(png: str, files: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for f in files:
        rows += [r for r in json.loads(Path(f).read_text())["rows"] if "error" not in r]
    fp = next(r for r in rows if r["method"] == "fp32")
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.4 + 0.17 * ((len(rows) + 1) // 2)))
    # first match wins: the ECSQ (fmt=uniform) and GPTQ-rounding variants before their e4m3 families
    style = {"gptq, calibrated on the mix)": ("tab:purple", "P"),
             "(sensitivity, matched bytes) fmt=uniform, gptq rounding (calibrated": ("darkorange", "X"),
             "(uniform) fmt=uniform, gptq rounding (calibrated": ("gold", "X"),
             "fp32": ("k", "*"), "bitsandbytes": ("tab:blue", "s"), "HQQ": ("tab:orange", "^"),
             "GPTQ": ("tab:brown", "v"), "uniform, gptq)": ("magenta", "P"), "uniform, nearest)": ("tab:pink", "P"),
             "budget": ("tab:purple", "P"), "grid": ("tab:gray", "."),
             "(sensitivity, matched bytes) fmt=uniform, gptq": ("darkred", "X"),
             "(uniform) fmt=uniform, gptq": ("tab:olive", "X"), "(uniform) fmt=uniform": ("tab:cyan", "o"),
             "(uniform)": ("tab:green", "o"), "(sensitivity": ("tab:red", "D")}

    def short(m: str) -> str:
        return (m.replace(" (sensitivity, matched bytes)", " sensitivity").replace("budget export at ", "budget at ")
                .replace("bitsandbytes ", "").replace(" (uniform)", " uniform").replace("fmt=uniform, gptq rounding",
                "ECSQ+gptq").replace("fmt=uniform", "ECSQ"))

    handles = []
    for ax, dom, title in zip(axes, DOMAINS, ("KJV held-out", "pydoc")):
        for i, r in enumerate(rows, 1):  # a number at each point, the names in one legend: dense clusters stay legible
            if r is fp:  # the dotted line: its 32 bits would squeeze every other point into a corner
                continue
            c, mk = next((v for k, v in style.items() if k in r["method"]), ("gray", "x"))
            h = ax.scatter(r["bytes"] / 1e6, r["ppl"][dom], color=c, marker=mk, s=60, zorder=3,
                           label=f"{i}: {short(r['method'])}")
            if ax is axes[0]:
                handles.append(h)
            ax.annotate(str(i), (r["bytes"] / 1e6, r["ppl"][dom]), fontsize=7, textcoords="offset points",
                        xytext=(4, 3 if i % 2 else -9))
        ax.axhline(fp["ppl"][dom], color="k", lw=0.8, ls=":")
        ax.annotate(f"fp32 {fp['ppl'][dom]:.2f}", (0.01, fp["ppl"][dom]), xycoords=("axes fraction", "data"),
                    fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stored bytes of the 210 target linears (MB, log)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"SmolLM2-135M, {title} (40 x 256 tokens)")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    legend_in = 0.17 * ((len(handles) + 1) // 2) + 0.2  # inches the legend's rows take under the panels
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
