"""The regularisation schedule: ``lambda_t = l1_init * reg_factor ** floor(t / reg_every)``."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = ["RegularizationSchedule", "l1_weight_at"]


def l1_weight_at(step: int, l1_init: float, reg_factor: float, reg_every: int) -> float:
    """The L1 weight used for optimiser step ``step`` (0-based): a pure function of the step."""
    return float(l1_init) * float(reg_factor) ** (int(step) // int(reg_every))


class RegularizationSchedule(pl.Callback):
    """Sets ``pl_module.l1_weight`` before every step; the only schedule knob of ACIP.

    Being a function of the global step, it resumes exactly; its state (for the record and for
    checkpoints) is the last weight and step.
    """

    def __init__(self, l1_init: float, reg_factor: float, reg_every: int) -> None:
        if l1_init < 0 or reg_factor <= 0 or reg_every < 1:
            raise ValueError(
                f"bad schedule l1_init={l1_init}, reg_factor={reg_factor}, reg_every={reg_every}: "
                f"need l1_init >= 0, reg_factor > 0 (e.g. 1.01) and reg_every >= 1 steps"
            )
        self.l1_init, self.reg_factor, self.reg_every = float(l1_init), float(reg_factor), int(reg_every)
        self.l1_weight, self.step = self.l1_init, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.step = trainer.global_step
        self.l1_weight = l1_weight_at(self.step, self.l1_init, self.reg_factor, self.reg_every)
        pl_module.l1_weight = self.l1_weight

    def state_dict(self) -> dict[str, Any]:
        return {"l1_weight": self.l1_weight, "step": self.step, "l1_init": self.l1_init,
                "reg_factor": self.reg_factor, "reg_every": self.reg_every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.l1_weight, self.step = float(state["l1_weight"]), int(state["step"])
