"""Task losses of an ACIP run (the config group ``objective``; plain classes named by ``_target_``).

An objective is called as ``objective(pm, input_ids) -> (loss, parts)``: ``loss`` is the fp32 task
loss the L1 term is added to, ``parts`` its named components as floats (for the logs).

- :class:`CrossEntropy` (``objective=ce``): mean next-token cross-entropy, logits upcast to fp32.
- :class:`Distillation` (``objective=kd``, ``objective=ce_kd``): ``ce_weight * CE + kd_weight * KD``
  with ``KD = T^2 * mean over positions of KL(teacher_T || student_T)`` over the next-token
  distribution at temperature ``T``, in fp32. The teacher is the model itself under
  ``pm.dense_view()``: the uncompressed base model (every direction, no adapters, no gradient), so
  no second copy of the weights exists. At initialisation (masks all at their scaling, LoRA B = 0)
  student and teacher compute the same logits and KD is exactly 0, and so is its gradient:
  pure KD gives the masks no ranking signal until something has been pruned. CE on sampled tokens
  (``data=self_generated``) gives one from the first step, hence ``ce_kd``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CrossEntropy", "Distillation", "kl_divergence"]


def _next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_positions KL(softmax(t/T) || softmax(s/T))`` in fp32 (0 exactly when t == s)."""
    T = float(temperature)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / T, dim=-1)
    s = F.log_softmax(student_logits.float().flatten(0, -2) / T, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * (T * T)


class CrossEntropy:
    """Next-token cross-entropy on the batch's own tokens (the ACIP paper's task loss)."""

    name = "ce"
    uses_teacher = False

    def __call__(self, pm: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce = _next_token_ce(pm(input_ids=input_ids).logits, input_ids)
        return ce, {"ce": float(ce.detach())}

    def __repr__(self) -> str:
        return "CrossEntropy()"


class Distillation:
    """``ce_weight * CE + kd_weight * T^2 KL(teacher_T || student_T)``; the teacher is ``pm.dense_view()``."""

    uses_teacher = True

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0) -> None:
        for key, v in (("temperature", temperature), ("kd_weight", kd_weight), ("ce_weight", ce_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"objective.{key} must be a finite number >= 0, got {v!r}")
        if not temperature > 0:
            raise ValueError(f"objective.temperature must be > 0, got {temperature!r}")
        if kd_weight == 0 and ce_weight == 0:
            raise ValueError("objective.kd_weight and objective.ce_weight are both 0: the task loss would be 0")
        self.temperature, self.kd_weight, self.ce_weight = float(temperature), float(kd_weight), float(ce_weight)
        self.name = "kd" if ce_weight == 0 else "ce_kd"

    @torch.no_grad()
    def teacher_logits(self, pm: Any, input_ids: torch.Tensor) -> torch.Tensor:
        with pm.dense_view():
            return pm(input_ids=input_ids).logits

    def __call__(self, pm: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.teacher_logits(pm, input_ids) if self.kd_weight > 0 else None
        logits = pm(input_ids=input_ids).logits
        parts: dict[str, float] = {}
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight > 0:
            ce = _next_token_ce(logits, input_ids)
            loss = loss + self.ce_weight * ce
            parts["ce"] = float(ce.detach())
        if teacher is not None:
            kd = kl_divergence(teacher, logits, self.temperature)
            loss = loss + self.kd_weight * kd
            parts["kd"] = float(kd.detach())
        return loss, parts

    def __repr__(self) -> str:
        return f"Distillation(temperature={self.temperature}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight})"
