"""The LightningModule of an ACIP run: the loss, and the algorithm after every optimiser step.

    loss = task + lambda_t * sum_l || ReLU(m_l) ||_1          (both terms in fp32)

where ``task`` is the run's objective (:mod:`acip.train.objectives`: next-token CE by default,
distillation from the model's own dense view, or both)
in the ``"acip"`` phase; in the ``"post_tune"`` phase the L1 term is dropped and the masks'
learning rate is 0 (they stay bit-identical while the LoRA adapters train). With
``schedule.post_tune_ratios = (lo, hi)`` each post-tune step runs at a sampled ratio ``rho_t``
(:func:`acip.train.schedule.sampled_ratio`): the model computes its export at ``rho_t``
(:meth:`acip.ACIPModel.at_ratio` with the run's score map) from before the step's forward until
after its optimiser step, so the adapters learn to help at every ratio in ``[lo, hi]``. Only the
masks and the LoRA factors are trainable; every other parameter is frozen.

The module owns the run's :class:`acip.ScoreMap` (``module.score_map``) and its
:class:`~acip.train.schedule.ACIPSchedule`, and runs the algorithm itself
(:meth:`ACIPModule.after_step`), right after each ``optimizer.step()``. Callbacks only observe:
monitoring, checkpoints, the run directory, the final evaluation.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from .schedule import ACIPSchedule

__all__ = ["ACIPModule", "NonFiniteLossError", "ReplicaMismatchError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


class ReplicaMismatchError(RuntimeError):
    """The score map differs between DDP ranks (it must be replicated, like the masks)."""


class ACIPModule(pl.LightningModule):
    """Holds the parametrized model ``pm`` (an :class:`acip.ACIPModel`), its score map and schedule."""

    def __init__(self, pm: Any, lr: float, lora_lr: float, weight_decay: float = 0.0,
                 schedule: ACIPSchedule | None = None, meta: dict | None = None,
                 build: Any = None, objective: Any = None) -> None:
        """``pm`` is the parametrized model, or None with ``build``: a callable ``build(device) ->
        ACIPModel`` that :meth:`configure_model` runs on the training device (after the strategy
        has set it up), so every DDP rank / FSDP shard parametrizes on its own device."""
        super().__init__()
        if pm is None and build is None:
            raise TypeError("ACIPModule needs a parametrized model pm, or build(device) -> ACIPModel")
        self.lr, self.lora_lr, self.weight_decay = float(lr), float(lora_lr), float(weight_decay)
        self.schedule = schedule if schedule is not None else ACIPSchedule()
        from .objectives import CrossEntropy

        self.objective = objective if objective is not None else CrossEntropy()  # acip.train.objectives
        self.task_parts: dict[str, float] = {}
        self.l1_weight = self.schedule.l1_weight_at(0)
        self.meta, self.build_pm = meta, build
        self.pm: Any = None
        self.score_map: Any = None
        self.rank_digests: list[str] = []
        self.last: dict[str, float] = {}
        self._at_ratio: Any = None  # the open pm.at_ratio(rho_t) block of a sampled post-tune step
        self._ratio: float | None = None
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        if pm is not None:
            self.adopt(pm)

    def adopt(self, pm: Any) -> None:
        """Take ``pm`` as the model: a fresh score map from its masks; only masks and LoRA train."""
        from acip import ScoreMap

        self.pm = pm
        self.score_map = ScoreMap.from_masks(pm, method="acip", stop_ratio=self.schedule.stop_ratio, meta=self.meta)
        for p in self.pm.parameters():
            p.requires_grad_(False)
        for p in self.trainable():
            p.requires_grad_(True)

    def configure_model(self) -> None:
        """Parametrize here (once): Lightning calls this hook after the strategy set up the device and
        before checkpoint restore, DDP/FSDP wrapping and the optimizers."""
        if self.pm is None:
            device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self.adopt(self.build_pm(device))
            from .scale import shard_setup

            shard_setup(self)  # trainer=fsdp: SVD factors sharded per block, masks and LoRA replicated

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Module conversions (``trainer.precision=bf16-true`` casts the whole module) leave the masks and
        the singular values (the saved basis fingerprint) fp32."""
        pm = self._modules.get("pm")
        layers = list(pm.svd_layers().values()) if pm is not None else []
        before = [(l.mask.detach(), l.singular_values) for l in layers]  # the fp32 tensors, not bf16 round trips
        out = super()._apply(fn, *args, **kwargs)
        for l, (mask, sv) in zip(layers, before):
            if l.mask.dtype != mask.dtype:
                l.mask.data = mask.to(l.mask.device)
            if l.singular_values.dtype != sv.dtype:
                l.singular_values = sv.to(l.singular_values.device)
        return out

    @property
    def phase(self) -> str:
        return self.schedule.phase

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.pm.mask_parameters()) + list(self.pm.lora_parameters())

    # ------------------------------------------------------------------ the loss
    def l1_term(self) -> torch.Tensor:
        """``sum_l ||ReLU(m_l)||_1`` in fp32."""
        return torch.stack([torch.relu(m.float()).sum() for m in self.pm.mask_parameters()]).sum()

    def task_loss(self, input_ids: torch.Tensor, **teacher: torch.Tensor) -> torch.Tensor:
        """The objective's fp32 task loss (its named parts go to ``self.task_parts``); ``teacher``: the
        batch's cached ``teacher_ids`` / ``teacher_logp``, passed only when it carries them."""
        loss, self.task_parts = self.objective(self.pm, input_ids, **teacher)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        teacher = {k: batch[k] for k in ("teacher_ids", "teacher_logp") if k in batch}
        task, l1 = self.task_loss(batch["input_ids"], **teacher), self.l1_term()
        loss = task + self.l1_weight * l1 if self.phase == "acip" else task
        self.check_finite(loss)
        self.last = {"task_loss": float(task.detach()), "l1_loss": float(l1.detach()), "loss": float(loss.detach()),
                     "l1_weight": self.l1_weight, **self.task_parts}
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise on every rank at once when any rank's loss is NaN/inf (no DDP hang)."""
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        trainer = self._trainer  # None when the module is used outside a Trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) > 0:
            raise NonFiniteLossError(
                f"the training loss is {float(loss.detach())} at step {trainer.global_step if trainer else 0} (phase "
                f"{self.phase}, l1_weight={self.l1_weight:.3g}). The score map of the last good step "
                f"is kept on disk. Lower acip.lr / acip.lora_lr or acip.l1_init, or train in fp32."
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW: group 0 = masks (lr, no weight decay), group 1 = LoRA (lora_lr, weight_decay)."""
        groups = [{"params": self.pm.mask_parameters(), "lr": self.lr, "weight_decay": 0.0, "name": "masks"}]
        lora = self.pm.lora_parameters()
        if lora:
            groups.append({"params": lora, "lr": self.lora_lr, "weight_decay": self.weight_decay, "name": "lora"})
        return torch.optim.AdamW(groups, betas=(0.9, 0.999))

    # ------------------------------------------------------------------ the algorithm
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """``optimizer.step()``, then :meth:`after_step` for the step just taken.

        Here rather than in ``on_train_batch_end``: Lightning calls a module's
        ``on_train_batch_end`` after every callback's, so a checkpoint or the monitor at step t
        would see the score map and phase of step t - 1. Lightning counts the step as completed
        only when this hook returns, hence ``global_step + 1``.
        """
        try:
            super().optimizer_step(*args, **kwargs)
        finally:
            self.close_sampled_ratio()
        if self._ratio is not None:
            self.last["post_tune_ratio"] = self._ratio
        if self.after_step(self.trainer.global_step + 1):
            self.trainer.should_stop = True
            self.check_replicas()

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """The algorithm after optimiser step number ``step`` (1-based), in this fixed order:

        (a) score map: in the ``acip`` phase (the step that reaches the stop ratio included),
            ``score_map.update(masks)``: ``mask > 0 -> score = mask``; ``just reached <= 0 ->
            0``; then every ``mask <= 0`` loses 1. Skipped (last good scores kept) when a mask
            is non-finite; the next loss check stops the run.
        (b) stop check: size ratio ``<= stop_ratio`` -> enter post-tuning, or stop;
        (c) post-tune count: ``step - post_tune_start >= post_tune_steps`` -> stop;
        (d) ``l1_weight = lambda_step``, the weight of the next step.

        Returns True when the run should stop after this step.
        """
        sched = self.schedule
        if sched.phase == "acip":
            masks = self.pm.masks()
            if all(bool(torch.isfinite(m).all()) for m in masks.values()):
                self.score_map.update(masks)
                sched.updates += 1
        action = sched.advance(step, self.pm.size_ratio())
        if action == "post_tune":
            self.freeze_masks()
        self.l1_weight = sched.l1_weight_at(step)
        return action == "stop"

    def freeze_masks(self) -> None:
        """Masks' learning rate -> 0 (keeps DDP's gradient buckets intact; AdamW leaves them bit-identical)."""
        if self._trainer is not None:
            for opt in self._trainer.optimizers:
                for g in opt.param_groups:
                    if g.get("name") == "masks":
                        g["lr"] = 0.0

    def check_replicas(self) -> list[str]:
        """Gather ``score_map.digest()`` from every rank; raise if they differ. Collective: all ranks call it."""
        digest = self.score_map.digest()
        code = torch.tensor([int(digest[:15], 16)], dtype=torch.long, device=self.device)
        trainer = self._trainer
        gathered = trainer.strategy.all_gather(code) if trainer is not None and trainer.world_size > 1 else code
        self.rank_digests = [f"{int(v):015x}" for v in gathered.flatten().tolist()]
        if len(set(self.rank_digests)) > 1:
            raise ReplicaMismatchError(
                f"the score map differs between ranks (digests {self.rank_digests}): the masks were not replicated. "
                f"Use strategy=ddp (not ddp_spawn) and do not change masks outside the optimiser step."
            )
        return self.rank_digests

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Post-tuning with sampled ratios: enter ``pm.at_ratio(rho_t)`` for step ``t = global_step``
        (closed after the optimiser step, before :meth:`after_step`) and log ``train/post_tune_ratio``."""
        self._ratio = self.schedule.post_tune_ratio(self.trainer.global_step)
        if self._ratio is None or self._at_ratio is not None:  # gradient accumulation: the block is open
            return
        self._at_ratio = self.pm.at_ratio(self._ratio, self.score_map)
        self._at_ratio.__enter__()
        self.log("train/post_tune_ratio", self._ratio, on_step=True, on_epoch=False, batch_size=1)

    def close_sampled_ratio(self) -> None:
        """Leave the step's ``pm.at_ratio`` block (masks and pruning restored); a no-op when none is open."""
        block, self._at_ratio = self._at_ratio, None
        if block is not None:
            block.__exit__(None, None, None)

    # ------------------------------------------------------------------ lifecycle and checkpoints
    def on_train_start(self) -> None:
        step = self.trainer.global_step
        self.l1_weight = self.schedule.l1_weight_at(step)
        if self.phase == "post_tune":  # resumed inside the post-tune phase
            self.freeze_masks()

    def on_train_end(self) -> None:
        self.close_sampled_ratio()  # a run stopped inside a step leaves the model unpruned
        if not self.rank_digests:  # the run ended some other way than by the schedule
            self.check_replicas()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Only the trainable tensors, plus the schedule state and the scores."""
        keep = {id(p) for p in self.trainable()}
        # under FSDP the module's own names carry the wrappers ("_fsdp_wrapped_module."), the
        # checkpoint's full state dict does not: compare the names without them
        def plain(name: str) -> str:
            return name.replace("_fsdp_wrapped_module.", "")

        names = {plain(n) for n, p in self.named_parameters() if id(p) in keep}
        kept = {k: v for k, v in checkpoint["state_dict"].items() if plain(k) in names}
        missing = names - {plain(k) for k in kept}
        if missing and self.global_rank == 0:  # other ranks may hold an empty dict (FSDP rank0_only); rank 0 writes
            raise RuntimeError(f"the checkpoint's state_dict lacks {len(missing)} trainable tensor(s) (e.g. "
                               f"{sorted(missing)[:3]}): a resume would silently start them afresh. The strategy "
                               f"saved {len(checkpoint['state_dict'])} tensors; with FSDP it must save a full state dict")
        checkpoint["state_dict"] = kept
        checkpoint["acip"] = {"schedule": self.schedule.state_dict(),
                              "scores": {n: s.clone() for n, s in self.score_map.scores.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("acip")
        if state is None:
            raise KeyError("this checkpoint has no 'acip' state (schedule and scores): it was written by an older "
                           "acip. Start a new run, or resume with the acip version that wrote it.")
        self.schedule.load_state_dict(state["schedule"])
        self.score_map.set_scores({n: torch.as_tensor(s) for n, s in state["scores"].items()})
