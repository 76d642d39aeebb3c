"""Ratio sweeps: perplexity of one score map at many size ratios, without copying the model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

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


def format_table(columns: dict[str, dict[float, float]], reference: float | None = None) -> str:
    """A markdown table: one row per ratio, one column per method (perplexities)."""
    ratios = sorted({r for col in columns.values() for r in col}, reverse=True)
    head = "| ratio | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    if reference is not None:
        lines.append("| dense | " + " | ".join(f"{reference:.2f}" for _ in columns) + " |")
    for r in ratios:
        cells = [f"{columns[c][r]:.4g}" if r in columns[c] else "" for c in columns]
        lines.append(f"| {r:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ratio_curves(
    columns: dict[str, dict[float, float]], path: str | Path, reference: float | None = None, title: str = ""
) -> Path:
    """Save a ratio-vs-perplexity PNG (log y axis), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, col in columns.items():
        xs = sorted(col)
        ax.plot(xs, [col[x] for x in xs], marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", label=f"dense ({reference:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("size ratio (target-layer parameters kept)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title or "ratio vs perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
