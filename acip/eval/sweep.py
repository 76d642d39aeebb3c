"""Ratio sweeps: perplexity of one score map at many size ratios, without copying the model."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.parametrize import ACIPModel
from ..core.score_map import ScoreMap
from .perplexity import perplexity

__all__ = ["ratio_sweep", "plot_ratio_curves", "format_table"]


def ratio_sweep(
    pmodel: ACIPModel,
    score_map: ScoreMap,
    tokenizer: Any,
    windows: torch.Tensor,
    ratios: Sequence[float],
    batch_size: int = 8,
) -> dict[float, float]:
    """Held-out perplexity at each ratio, pruning ``pmodel`` reversibly (masks untouched).

    ``pmodel.prune(ratio, score_map)`` keeps exactly the directions that ``acip.export`` would
    keep, so the figures equal those of exported models (without LoRA folding round-off).
    """
    from tqdm.auto import tqdm

    out: dict[float, float] = {}
    try:
        for r in tqdm(list(ratios), desc=f"ratio sweep ({score_map.method})"):
            pmodel.prune(r, score_map)
            out[float(r)] = perplexity(pmodel, tokenizer, windows, batch_size=batch_size, progress=False)
    finally:
        pmodel.unprune()
    return out


def format_table(columns: Mapping[str, Mapping[float, float]], reference: float | None = None,
                 ratios: Sequence[float] | None = None, suffix: str = "") -> str:
    """A markdown table (pasteable into docs): one row per ratio, one column per method.

    ``columns[method][ratio]`` are perplexities; ``ratios`` default to every ratio seen,
    largest first; ``reference`` adds a ``dense`` row; ``suffix`` is appended to each header
    (``" ppl"``). Cells: two decimals, ``inf`` for a non-finite value, empty where missing.
    """
    if ratios is None:
        ratios = sorted({r for col in columns.values() for r in col}, reverse=True)

    def cell(v: float | None) -> str:
        return "" if v is None else (f"{v:.2f}" if math.isfinite(v) else "inf")

    lines = ["| ratio | " + " | ".join(f"{m}{suffix}" for m in columns) + " |", "|---:|" + "---:|" * len(columns)]
    if reference is not None:
        lines.append("| dense | " + " | ".join(cell(reference) for _ in columns) + " |")
    for r in ratios:
        lines.append(f"| {r:.2f} | " + " | ".join(cell(columns[m].get(r)) for m in columns) + " |")
    return "\n".join(lines)


def plot_ratio_curves(columns: Mapping[str, Mapping[float, float]], path: str | Path,
                      reference: float | None = None, title: str = "") -> Path:
    """Held-out perplexity (log y) against the target-layer size ratio, one line per method.

    The x axis runs from dense (1.0) to small; ``reference`` draws the uncompressed model's
    perplexity. Written atomically as a PNG; returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, col in columns.items():
        xs = sorted(col)
        ax.plot(xs, [col[x] for x in xs], marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=1, label=f"uncompressed ({reference:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("size ratio (target layers)")
    ax.set_ylabel("held-out perplexity")
    if title:
        ax.set_title(title)
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
