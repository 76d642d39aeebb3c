"""The run directory as one artifact: rank 0 saves the parametrized model with its score map.

``pm.score_map = module.score_map; pm.save_pretrained(run_dir)`` writes ``acip_config.json``,
``acip_state.safetensors`` (masks, LoRA, basis, scores; the commit point) and
``score_map.safetensors``, each atomically, so ``acip.load(run_dir)`` / ``acip.export(run_dir,
ratio)`` work at any moment of the run. Saved with every Lightning checkpoint, at the end, and
when the run fails (the last good state: never non-finite masks or scores).

Under ``trainer=fsdp`` each rank holds only its flat shard of the LoRA factors (and of every other
parameter), so the save is collective: every rank gathers the full parameters and rank 0 writes
(:func:`acip.train.scale.rank_zero_with_full_params`). A failing FSDP run saves nothing more (the
failure may be one rank's alone, and a gather that not every rank joins never returns): the files of
its last checkpoint stay.
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
        """Write the run directory on rank 0. Under FSDP every rank must call it (it gathers the shards)."""
        from ..scale import rank_zero_with_full_params

        def write() -> None:
            sm = pl_module.score_map
            sm.meta.update(updates=int(pl_module.schedule.updates), global_step=int(trainer.global_step))
            pl_module.pm.score_map = sm
            pl_module.pm.save_pretrained(self.run_dir)

        rank_zero_with_full_params(trainer, pl_module, write)

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
        from ..scale import is_fsdp

        if is_fsdp(trainer):  # collective: the other ranks may never join (see the module's docstring)
            return
        if _finite(pl_module.score_map.scores.values()) and _finite(pl_module.pm.adapter_state().values()):
            self.save(trainer, pl_module)
