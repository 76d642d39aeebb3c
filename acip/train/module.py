"""The LightningModule of an ACIP run.

    loss = CE(next token) + lambda_t * sum_l || ReLU(m_l) ||_1          (both terms in fp32)

in the ``"acip"`` phase; in the ``"post_tune"`` phase the L1 term is dropped and the masks'
learning rate is 0 (they stay bit-identical while the LoRA adapters train). Only the masks and
the LoRA factors are trainable; every other parameter is frozen. ``lambda_t`` (``l1_weight``) is
set by :class:`acip.train.callbacks.RegularizationSchedule`.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

__all__ = ["ACIPModule", "NonFiniteLossError"]

PHASES = ("acip", "post_tune")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


class ACIPModule(pl.LightningModule):
    """Holds the parametrized model ``pm`` (an :class:`acip.ACIPModel`)."""

    def __init__(self, pm: Any, lr: float, lora_lr: float, weight_decay: float = 0.0,
                 l1_weight: float = 0.0) -> None:
        super().__init__()
        self.pm = pm
        self.lr, self.lora_lr, self.weight_decay = float(lr), float(lora_lr), float(weight_decay)
        self.l1_weight = float(l1_weight)
        self.phase = "acip"
        self.post_tune_start = -1
        self.last: dict[str, float] = {}
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        for p in self.pm.parameters():
            p.requires_grad_(False)
        for p in self.trainable():
            p.requires_grad_(True)

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.pm.mask_parameters()) + list(self.pm.lora_parameters())

    def l1_term(self) -> torch.Tensor:
        """``sum_l ||ReLU(m_l)||_1`` in fp32."""
        return torch.stack([torch.relu(m.float()).sum() for m in self.pm.mask_parameters()]).sum()

    def task_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, logits upcast to fp32."""
        logits = self.pm(input_ids=input_ids).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        task = self.task_loss(batch["input_ids"])
        l1 = self.l1_term()
        loss = task + self.l1_weight * l1 if self.phase == "acip" else task
        self.check_finite(loss)
        self.last = {"task_loss": float(task.detach()), "l1_loss": float(l1.detach()), "loss": float(loss.detach())}
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise on every rank at once when any rank's loss is NaN/inf (no DDP hang)."""
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        trainer = self._trainer  # None when the module is used outside a Trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) > 0:
            raise NonFiniteLossError(
                f"the training loss is {float(loss.detach())} at step {self._trainer.global_step if self._trainer else 0} (phase "
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

    def enter_post_tune(self, start_step: int) -> None:
        """Freeze the masks by zeroing their learning rate (keeps DDP's gradient buckets intact).

        ``start_step`` is the global step count at the switch (post-tune steps = step - start).
        """
        self.phase, self.post_tune_start = "post_tune", int(start_step)
        if self._trainer is not None:
            for opt in self._trainer.optimizers:
                for g in opt.param_groups:
                    if g.get("name") == "masks":
                        g["lr"] = 0.0

    # only the trainable tensors go into checkpoints; the frozen ones come from the base model
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {id(p) for p in self.trainable()}
        names = {n for n, p in self.named_parameters() if id(p) in keep}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        checkpoint["acip_phase"] = self.phase
        checkpoint["acip_l1_weight"] = self.l1_weight
        checkpoint["acip_post_tune_start"] = self.post_tune_start

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.phase = checkpoint.get("acip_phase", "acip")
        self.l1_weight = float(checkpoint.get("acip_l1_weight", self.l1_weight))
        self.post_tune_start = int(checkpoint.get("acip_post_tune_start", -1))
