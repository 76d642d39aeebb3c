"""PNG plots of a run's score map (matplotlib, Agg backend): each function writes one file.

The ratio-vs-perplexity curve is :func:`acip.eval.sweep.plot_ratio_curves`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["plot_score_heatmap", "plot_kept_ranks"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from acip.core.io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)
    return path


def plot_score_heatmap(scores: Mapping[str, torch.Tensor], path: Path, bins: int = 64) -> Path:
    """Layers (rows) x normalised singular-direction index j/k (columns, binned).

    Colour = the score's rank in the global order as a quantile (0 = pruned first, 1 = kept
    longest), so layers of different size and score scale share one colour bar.
    """
    plt = _plt()
    names = list(scores)
    allv = torch.cat([scores[n].float() for n in names])
    order = torch.empty_like(allv)
    order[torch.argsort(allv, stable=True)] = torch.linspace(0, 1, len(allv))
    grid = torch.zeros(len(names), bins)
    off = 0
    for i, n in enumerate(names):
        k = scores[n].numel()
        q = order[off : off + k]
        off += k
        idx = (torch.arange(k) * bins // k).clamp_max(bins - 1)
        grid[i] = torch.zeros(bins).index_add_(0, idx, q) / torch.bincount(idx, minlength=bins).clamp_min(1)
    fig, ax = plt.subplots(figsize=(7, max(3, 0.12 * len(names) + 1)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, extent=(0, 1, len(names), 0))
    ax.set_xlabel("normalised rank j/k (singular-value order)")
    ax.set_ylabel("layer")
    if len(names) <= 40:
        ax.set_yticks([i + 0.5 for i in range(len(names))], names, fontsize=6)
    fig.colorbar(im, ax=ax, label="score quantile (0 = pruned first)")
    return _save(fig, path)


def plot_kept_ranks(ranks: Mapping[float, Mapping[str, int]], max_ranks: Mapping[str, int], path: Path) -> Path:
    """Kept rank / max rank per layer (x = layer index), one line per test ratio."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(max_ranks)
    for ratio in sorted(ranks, reverse=True):
        ax.plot(range(len(names)), [ranks[ratio][n] / max_ranks[n] for n in names], marker=".", lw=1, label=f"{ratio:g}")
    ax.set_xlabel("layer index (module order)")
    ax.set_ylabel("kept rank / full rank")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(title="ratio", fontsize=7)
    return _save(fig, path)
