"""Size ratio against optimiser step, from the ``metrics.csv`` of finished runs (one PNG).

    python scripts/plot_ratio_curves.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--title T]
                                        [--panel "title" LABEL=RUN_DIR ...]

Each ``--panel`` starts a new subplot. The stop ratio of each run is a dotted line.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(run: Path) -> tuple[list[int], list[float]]:
    steps, ratios = [], []
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("size_ratio") not in (None, ""):
                steps.append(int(row["step"]))
                ratios.append(float(row["size_ratio"]))
    return steps, ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("items", nargs="+", help='"--panel TITLE" separators and LABEL=RUN_DIR pairs')
    args, rest = ap.parse_known_args()
    panels: list[tuple[str, list[tuple[str, Path]]]] = [("", [])]
    tokens = args.items + rest
    i = 0
    while i < len(tokens):
        if tokens[i] == "--panel":
            panels.append((tokens[i + 1], []))
            i += 2
            continue
        label, _, path = tokens[i].partition("=")
        panels[-1][1].append((label, Path(path)))
        i += 1
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        stops = set()
        for label, run in runs:
            s, r = read(run)
            ax.plot(s, r, marker="o", markersize=3, label=label)
            cfg = run / "config.yaml"
            if cfg.is_file():
                from omegaconf import OmegaConf

                stops.add(float(OmegaConf.load(cfg).acip.stop_ratio))
        for st in stops:
            ax.axhline(st, linestyle=":", color="grey", linewidth=1)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("size ratio of the target layers")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
