"""Monitoring every ``every`` steps: size ratio, active ranks per layer, L1 weight, task loss,
L1 loss, step time and tokens/s. Losses are averaged over ranks; tokens/s counts all ranks. Under
``trainer=fsdp`` ``size_ratio_full`` counts whole tensors, not a rank's shard (:meth:`acip.ACIPModel.pin_numels`).

Rows go to every Lightning logger (W&B, CSV) and to ``<run_dir>/metrics.csv`` (rewritten
atomically; rank 0 only). A one-line summary is printed.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["Monitor", "write_csv"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (union of their keys as columns, first-seen order) atomically."""
    from acip.core.io import atomic_write

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


class Monitor(pl.Callback):
    def __init__(self, run_dir: str | Path, every: int = 10, ranks_per_layer: bool = True, verbose: bool = True) -> None:
        if every < 1:
            raise ValueError(f"monitor every must be >= 1 step, got {every}")
        self.path = Path(run_dir) / "metrics.csv"
        self.every, self.ranks_per_layer, self.verbose = int(every), bool(ranks_per_layer), verbose
        self.rows: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._tokens = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()
        self._tokens = int(batch["input_ids"].numel())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every and not trainer.should_stop:
            return
        dt = time.perf_counter() - self._t0
        last = pl_module.last
        vals = torch.tensor([last.get("task_loss", float("nan")), last.get("l1_loss", float("nan")), dt], dtype=torch.float64)
        if trainer.world_size > 1:
            vals = trainer.strategy.reduce(vals, reduce_op="mean")
        task, l1, dt = (float(v) for v in vals)
        row: dict[str, Any] = {
            "step": step,
            "phase": pl_module.phase,
            "size_ratio": pl_module.pm.size_ratio(),
            "size_ratio_full": pl_module.pm.size_ratio(full=True),
            "l1_weight": last.get("l1_weight", pl_module.l1_weight),  # the weight this step used
            "task_loss": task,
            "l1_loss": l1,
            "step_time_s": dt,
            "tokens_per_s": self._tokens * trainer.world_size / max(dt, 1e-9),
        }
        if self.ranks_per_layer:
            row.update({f"rank/{n}": r for n, r in pl_module.pm.active_ranks().items()})
        if not trainer.is_global_zero:
            return
        self.rows.append(row)
        write_csv(self.path, self.rows)
        numeric = {("train/" + k if "/" not in k else k): float(v) for k, v in row.items() if k not in ("step", "phase")}
        numeric["train/post_tune"] = float(row["phase"] == "post_tune")
        for lg in trainer.loggers:
            lg.log_metrics(numeric, step=step)
        if self.verbose:
            print(f"[acip] step {step:5d} {row['phase']:9s} ratio {row['size_ratio']:.3f} task {task:.4f} "
                  f"l1 {l1:.1f} lambda {row['l1_weight']:.3g} {dt:.2f}s/step {row['tokens_per_s']:.0f} tok/s", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))
