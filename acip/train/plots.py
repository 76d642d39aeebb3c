"""PNG plots of a run's score map (matplotlib, Agg backend): each function writes one file.

The ratio-vs-perplexity curve is :func:`acip.eval.sweep.plot_ratio_curves`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["plot_score_heatmap", "plot_kept_ranks", "block_and_type", "MODULE_TYPES"]


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


MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down")


def block_and_type(name: str) -> tuple[int | None, str]:
    """``("model.layers.3.self_attn.q_proj") -> (3, "q")``; other names: first number, last part."""
    import re

    parts = name.split(".")
    block = next((int(p) for p in parts if p.isdigit()), None)
    leaf = parts[-1]
    short = re.sub(r"_proj$", "", leaf)
    return block, short


def plot_kept_ranks(ranks: Mapping[float, Mapping[str, int]], max_ranks: Mapping[str, int], path: Path) -> Path:
    """Kept rank / full rank as a heatmap of blocks (rows) x module type (columns), one panel per ratio.

    The module types are q/k/v/o/gate/up/down for Llama-like models (other names keep their last
    part, ``_proj`` dropped); a layer outside numbered blocks gets its own row.
    """
    import numpy as np

    plt = _plt()
    names = list(max_ranks)
    where = {n: block_and_type(n) for n in names}
    types = [t for t in MODULE_TYPES if any(w[1] == t for w in where.values())]
    types += sorted({w[1] for w in where.values()} - set(types))
    blocks = sorted({w[0] for w in where.values() if w[0] is not None})
    rows = [str(b) for b in blocks] + (["other"] if any(w[0] is None for w in where.values()) else [])
    ratios = sorted(ranks, reverse=True)
    fig, axes = plt.subplots(1, len(ratios), figsize=(1.1 + 0.32 * len(types) * len(ratios) + 0.4 * len(ratios),
                                                     1.4 + 0.16 * len(rows)), squeeze=False, sharey=True)
    im = None
    for ax, ratio in zip(axes[0], ratios):
        grid = np.full((len(rows), len(types)), np.nan)
        for n in names:
            b, t = where[n]
            i = rows.index("other" if b is None else str(b))
            grid[i, types.index(t)] = ranks[ratio].get(n, 0) / max(1, max_ranks[n])
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(types)), types, fontsize=7, rotation=90)
        ax.set_title(f"ratio {ratio:g}", fontsize=9)
        ax.set_xticks(np.arange(-0.5, len(types)), minor=True)
        ax.tick_params(which="minor", length=0)
    axes[0][0].set_ylabel("block")
    step = max(1, len(rows) // 16)
    axes[0][0].set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), label="kept rank / full rank", fraction=0.03, pad=0.02)
    return _save(fig, path)
