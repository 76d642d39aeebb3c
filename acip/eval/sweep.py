"""Ratio sweeps: perplexity of one score map at many size ratios, without copying the model."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.parametrize import ACIPModel
from ..core.score_map import ScoreMap
from .perplexity import perplexity

__all__ = ["ratio_sweep", "plot_ratio_curves", "plot_domain_curves", "format_table"]


def ratio_sweep(
    pmodel: ACIPModel,
    score_map: ScoreMap,
    tokenizer: Any,
    windows: torch.Tensor,
    ratios: Sequence[float],
    batch_size: int = 8,
) -> dict[float, float]:
    """Held-out perplexity at each ratio, computed by the model that ``acip.export`` builds there.

    Each ratio runs inside ``pmodel.at_ratio(ratio, score_map)``: the best-scored directions are
    kept and every kept direction gets its full gate ``c`` (a trained mask may be ``<= 0`` above
    the ratio it was trained to, which ``prune`` alone would leave off), so the figures equal those
    of exported models (without LoRA folding round-off). Masks and pruning state are restored.
    """
    from tqdm.auto import tqdm

    out: dict[float, float] = {}
    for r in tqdm(list(ratios), desc=f"ratio sweep ({score_map.method})"):
        with pmodel.at_ratio(r, score_map):
            out[float(r)] = perplexity(pmodel, tokenizer, windows, batch_size=batch_size, progress=False)
    return out


def format_table(columns: Mapping[str, Mapping[float, float]], reference: float | None = None,
                 ratios: Sequence[float] | None = None, suffix: str = "",
                 notes: Mapping[str, Mapping[float, str]] | None = None) -> str:
    """A markdown table (pasteable into docs): one row per ratio, one column per method.

    ``columns[method][ratio]`` are perplexities; ``ratios`` default to every ratio seen,
    largest first; ``reference`` adds a first ``dense`` row (the uncompressed model); ``suffix`` is
    appended to each header (``" ppl"``); ``notes[name][ratio]`` adds text columns after the
    numbers (e.g. which adapters setting an export used). Cells: two decimals, ``inf`` for a
    non-finite value, empty where missing.
    """
    notes = dict(notes or {})
    if ratios is None:
        ratios = sorted({r for col in columns.values() for r in col}, reverse=True)

    def cell(v: float | None) -> str:
        return "" if v is None else (f"{v:.2f}" if math.isfinite(v) else "inf")

    heads = [f"{m}{suffix}" for m in columns] + list(notes)
    lines = ["| ratio | " + " | ".join(heads) + " |", "|---:|" + "---:|" * len(columns) + ":---|" * len(notes)]
    if reference is not None:
        lines.append("| dense | " + " | ".join([cell(reference) for _ in columns] + ["" for _ in notes]) + " |")
    for r in ratios:
        lines.append(f"| {r:.2f} | " + " | ".join([cell(columns[m].get(r)) for m in columns]
                                                 + [str(notes[n].get(r, "")) for n in notes]) + " |")
    return "\n".join(lines)


def _clip_top(values: Sequence[float], reference: float | None, clip: float) -> float | None:
    """The y-axis top: ``clip`` x the reference (or x the smallest value), unless every value is below it."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if not finite:
        return None
    low = reference if reference is not None and math.isfinite(reference) and reference > 0 else min(finite)
    top = low * clip
    return None if max(finite) <= top and len(finite) == len(values) else top


def _draw(ax: Any, columns: Mapping[str, Mapping[float, float]], reference: float | None, clip: float,
          colors: Mapping[str, Any] | None = None) -> str:
    """One panel: a line per method on a log y axis clipped at ``clip`` x the reference.

    A point above the clip (or infinite) is drawn on the top edge as a hollow triangle, labelled
    with its value, so a baseline that is 1e6 times worse does not flatten the others. Labels of
    several clipped points at one ratio are stacked below the edge, one line each (a value already
    labelled there, e.g. column ``acip`` equal to the column it follows, is not repeated). Returns a
    note on the clip for the panel's title ("" if nothing is clipped).
    """
    import matplotlib.ticker as mticker

    allv = [v for col in columns.values() for v in col.values()]
    top = _clip_top(allv + ([reference] if reference is not None else []), reference, clip)
    labelled: dict[float, list[str]] = {}  # ratio -> the clipped values labelled there, top to bottom
    for name, col in columns.items():
        xs = sorted(col)
        ys = [col[x] for x in xs]
        shown = [min(y, top) if top is not None and math.isfinite(y) else (top if top is not None else y) for y in ys]
        style = dict(lw=4.5, alpha=0.35, zorder=1) if name == "acip" else dict(lw=1.4, zorder=2)  # the default
        if colors and name in colors:
            style["color"] = colors[name]
        (line,) = ax.plot(xs, shown, marker="o", ms=4, label=name, **style)  # export stays visible under a twin
        for x, y, yy in zip(xs, ys, shown):
            if top is not None and (not math.isfinite(y) or y > top):
                ax.plot([x], [yy], marker="^", ms=9, mfc="none", color=line.get_color())
                text = "inf" if not math.isfinite(y) else f"{y:.3g}"
                here = labelled.setdefault(x, [])
                if text not in here:
                    ax.annotate(text, (x, yy), textcoords="offset points", xytext=(0, -12 - 8 * len(here)),
                                ha="center", fontsize=6, color=line.get_color())
                    here.append(text)
    if reference is not None:
        ax.axhline(reference, color="black", ls="--", lw=1, label=f"uncompressed ({reference:.2f})")
    ax.set_yscale("log")
    ax.margins(x=0.08)  # room for the value labels of the first and last ratio
    if top is not None:
        finite = [v for v in allv if math.isfinite(v) and v > 0] + ([reference] if reference else [])
        ax.set_ylim(min(finite) / 1.15, top * 1.3)
    plain = mticker.FuncFormatter(lambda v, _: f"{v:.4g}")
    lo, hi = ax.get_ylim()
    if hi / max(lo, 1e-300) < 20:  # a narrow range: label the minor ticks too
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax.yaxis.set_major_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    if top is None:
        return ""
    return f"y clipped at {clip:g}x " + ("uncompressed" if reference is not None else "the best") + " (\u25b3: above)"


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every panel."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from ..core.io import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratio_curves(columns: Mapping[str, Mapping[float, float]], path: str | Path,
                      reference: float | None = None, title: str = "", clip: float = 30.0) -> Path:
    """Held-out perplexity (log y) against the target-layer size ratio, one line per method.

    The x axis runs from dense (1.0) to small; ``reference`` draws the uncompressed model's
    perplexity; the y axis is clipped at ``clip`` x the reference (points above it sit on the top
    edge, labelled). Written atomically as a PNG; returns ``path``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    note = _draw(ax, columns, reference, clip)
    ax.set_xlabel("size ratio (target layers)")
    ax.set_ylabel("held-out perplexity")
    if title or note:
        ax.set_title("\n".join(t for t in (title, note) if t), fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_domain_curves(domains: Mapping[str, Mapping[str, Mapping[float, float]]], path: str | Path,
                       references: Mapping[str, float] | None = None, clip: float = 30.0, title: str = "") -> Path:
    """One panel per domain (``domains[domain][method][ratio]``), each as :func:`plot_ratio_curves`."""
    plt = _pyplot()
    references = dict(references or {})
    n = len(domains)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    methods = list(dict.fromkeys(m for cols in domains.values() for m in cols))
    colors = _colors(methods)
    seen: dict[str, Any] = {}
    for ax, (dom, columns) in zip(axes.flat, domains.items()):
        note = _draw(ax, columns, references.get(dom), clip, colors)
        ax.set_title(dom + (f"\n{note}" if note else ""), fontsize=9)
        ax.set_xlabel("size ratio (target layers)")
        ax.set_ylabel("perplexity")
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault("uncompressed" if lab.startswith("uncompressed") else lab, h)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    labels = [m for m in methods if m in seen] + (["uncompressed"] if "uncompressed" in seen else [])
    handles = [seen[lab] for lab in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)
