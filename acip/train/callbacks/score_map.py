"""The score-map recorder: DESIGN.md's update rule after every optimiser step of the run.

After each step of the ``acip`` phase it calls ``ScoreMap.update(masks)``::

    mask > 0                 -> score = mask value
    mask just reached <= 0   -> score = 0
    then every mask <= 0     -> score -= 1

Masks are DDP-replicated parameters (identical on every rank after the all-reduced step), so
the score map is identical on every rank; ``on_train_end`` checks that with a digest gathered
from all ranks. Only rank 0 writes: ``score_map.safetensors`` and ``adapters/`` (atomically)
with every checkpoint, at the end, and when the run fails (the last good state).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["ScoreMapRecorder", "score_digest"]

SCORE_MAP_FILE = "score_map.safetensors"
ADAPTERS_DIR = "adapters"


def score_digest(scores: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and exact float32 bytes of the scores (order as stored)."""
    h = hashlib.sha256()
    for name, s in scores.items():
        h.update(name.encode())
        h.update(s.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ScoreMapRecorder(pl.Callback):
    """Builds ``ScoreMap.from_masks(pm)`` at train start and keeps it current."""

    def __init__(self, run_dir: str | Path, stop_ratio: float | None = None, meta: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.stop_ratio = stop_ratio
        self.meta = dict(meta or {})
        self.score_map: Any = None
        self.updates = 0
        self.rank_digests: list[str] = []
        self._restored: dict[str, torch.Tensor] | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / SCORE_MAP_FILE

    def ensure(self, pl_module: Any) -> Any:
        """Create the score map (or re-create it from restored checkpoint state)."""
        if self.score_map is None:
            from acip import ScoreMap

            self.score_map = ScoreMap.from_masks(
                pl_module.pm, method="acip", stop_ratio=self.stop_ratio,
                meta={"adapters": ADAPTERS_DIR, **self.meta},
            )
            if self._restored is not None:
                self.score_map.set_scores(self._restored)
                self._restored = None
        return self.score_map

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.ensure(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.phase != "acip":
            return  # masks are frozen while post-tuning: the order is final
        masks = pl_module.pm.masks()
        if not all(torch.isfinite(m.detach()).all() for m in masks.values()):
            return  # leave the last good scores; the next step's loss check stops the run
        self.ensure(pl_module).update(masks)
        self.updates += 1

    def save(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Rank 0: write the score map and the adapters atomically."""
        if not trainer.is_global_zero or self.score_map is None:
            return
        self.score_map.meta["updates"] = self.updates
        self.score_map.meta["global_step"] = int(trainer.global_step)
        pl_module.pm.save_adapters(self.run_dir / ADAPTERS_DIR)
        self.score_map.save(self.path)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        sm = self.ensure(pl_module)
        digest = score_digest(sm.scores)
        code = torch.tensor([int(digest[:15], 16)], dtype=torch.long)
        gathered = trainer.strategy.all_gather(code) if trainer.world_size > 1 else code
        self.rank_digests = [f"{int(v):015x}" for v in gathered.flatten().tolist()]
        self.save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # the masks are untouched by a step that failed before its optimiser update; never
        # overwrite a good file with non-finite state
        if self.score_map is not None and all(torch.isfinite(s).all() for s in self.score_map.scores.values()) \
                and all(torch.isfinite(m.detach()).all() for m in pl_module.pm.mask_parameters()):
            self.save(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.score_map is None:
            return {"updates": self.updates}
        return {"updates": self.updates, "scores": {n: s.clone() for n, s in self.score_map.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        if "scores" in state:
            self._restored = {n: torch.as_tensor(s) for n, s in state["scores"].items()}
            if self.score_map is not None and self.score_map.model is not None:
                self.score_map.set_scores(self._restored)
                self._restored = None
