"""The run directory as one artifact: rank 0 saves the parametrized model with its score map.

``pm.score_map = module.score_map; pm.save_pretrained(run_dir)`` writes ``acip_config.json``,
``acip_state.safetensors`` (masks, LoRA, basis, scores; the commit point) and
``score_map.safetensors``, each atomically, so ``acip.load(run_dir)`` / ``acip.export(run_dir,
ratio)`` work at any moment of the run. Saved with every Lightning checkpoint, at the end, and
when the run fails (the last good state: never non-finite masks or scores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["RunArtifacts"]


def _finite(tensors: Any) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


class RunArtifacts(pl.Callback):
    """Writes ``run_dir`` as an :class:`acip.ACIPModel` directory (rank 0 only)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def save(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        sm = pl_module.score_map
        sm.meta.update(updates=int(pl_module.schedule.updates), global_step=int(trainer.global_step))
        pl_module.pm.score_map = sm
        pl_module.pm.save_pretrained(self.run_dir)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # a step that failed in its loss check left the masks of the last good step; never
        # overwrite good files with non-finite state. A run that failed before configure_model
        # (no model, no score map yet) has nothing to save.
        if getattr(pl_module, "pm", None) is None or getattr(pl_module, "score_map", None) is None:
            return
        if _finite(pl_module.score_map.scores.values()) and _finite(pl_module.pm.adapter_state().values()):
            self.save(trainer, pl_module)
