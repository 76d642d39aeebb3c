"""Stop-at-ratio and post-tuning.

``StopAtRatio``: after each optimiser step of the ``acip`` phase, measure the size ratio of the
target layers at their active ranks; once it is ``<= stop_ratio`` either switch the module to the
``post_tune`` phase (masks frozen) or stop the run. ``PostTuning`` counts the post-tune steps and
stops after ``steps`` of them.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = ["StopAtRatio", "PostTuning", "check_stop_ratio"]


def check_stop_ratio(stop_ratio: float) -> float:
    """A stop ratio must lie strictly inside (0, 1)."""
    try:
        r = float(stop_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"acip.stop_ratio must be a number in (0, 1), got {stop_ratio!r}") from None
    if not 0.0 < r < 1.0:
        raise ValueError(
            f"acip.stop_ratio={stop_ratio!r} is outside (0, 1): it is the fraction of the target "
            f"layers' parameters at which training stops, e.g. acip.stop_ratio=0.4"
        )
    return r


class StopAtRatio(pl.Callback):
    """Ends the ``acip`` phase at ``size_ratio <= stop_ratio``."""

    def __init__(self, stop_ratio: float, post_tune_steps: int = 0) -> None:
        self.stop_ratio = check_stop_ratio(stop_ratio)
        self.post_tune_steps = int(post_tune_steps)
        self.stop_step: int | None = None
        self.reached_ratio: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.phase != "acip":
            return
        ratio = pl_module.pm.size_ratio()
        if ratio <= self.stop_ratio:
            self.stop_step, self.reached_ratio = trainer.global_step, float(ratio)
            if self.post_tune_steps > 0:
                pl_module.enter_post_tune(trainer.global_step)
            else:
                trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"stop_step": self.stop_step, "reached_ratio": self.reached_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stop_step, self.reached_ratio = state.get("stop_step"), state.get("reached_ratio")


class PostTuning(pl.Callback):
    """Trains the adapters for ``steps`` steps with the masks frozen, then stops the run.

    Post-tune steps done = ``global_step - pl_module.post_tune_start`` (the step count at the
    switch), so the count resumes exactly from a checkpoint.
    """

    def __init__(self, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"acip.post_tune_steps must be >= 0, got {steps}")
        self.steps, self.done = int(steps), 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if pl_module.phase == "post_tune":  # resumed inside the post-tune phase
            pl_module.enter_post_tune(pl_module.post_tune_start)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.phase != "post_tune":
            return
        self.done = trainer.global_step - int(pl_module.post_tune_start)
        if self.done >= self.steps:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state["done"])
