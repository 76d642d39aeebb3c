"""Task losses of an ACIP run (the config group ``objective``; plain classes named by ``_target_``).

An objective is called as ``objective(pm, input_ids, **teacher) -> (loss, parts)``: ``loss`` is the
fp32 task loss the L1 term is added to, ``parts`` its named components as floats (for the logs).
``teacher`` is ``teacher_ids`` / ``teacher_logp`` when the batch carries the teacher's cached top-k
(``data=self_generated`` with ``data.teacher_topk``), else nothing.

- :class:`CrossEntropy` (``objective=ce``): mean next-token cross-entropy, logits upcast to fp32.
- :class:`Distillation` (``objective=kd``, ``objective=ce_kd``): ``ce_weight * CE + kd_weight * KD``
  with ``KD = T^2 * mean over positions of KL(teacher_T || student_T)`` over the next-token
  distribution at temperature ``T``, in fp32. The teacher is the model itself under
  ``pm.dense_view()``: the uncompressed base model (every direction, no adapters, no gradient), so
  no second copy of the weights exists. At initialisation (masks all at their scaling, LoRA B = 0)
  student and teacher compute the same logits and KD is exactly 0, and so is its gradient:
  pure KD gives the masks no ranking signal until something has been pruned. CE on sampled tokens
  (``data=self_generated``) gives one from the first step, hence ``ce_kd``.

  With a cached teacher top-K in the batch the teacher forward is skipped and KD is
  :func:`topk_kl_divergence`: the KL over the K cached tokens plus one bucket for the rest of the
  vocabulary (exact when K = V). The cache holds the base model itself, not its SVD reconstruction,
  so at initialisation KD is ~0 (the reconstruction error), not exactly 0. ``teacher_topk = K > 0``
  gives any other training data (packed text) the same cache: the base model's top-K at every
  position of the packed rows, computed once before the run parametrizes the model
  (:func:`acip.train.sources.packed_teacher_topk` via :func:`acip.train.run.attach_teacher`, cached on disk by the rows' checksum).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CrossEntropy", "Distillation", "kl_divergence", "topk_kl_divergence"]

TAIL_FLOOR = 1e-30  # the tail bucket's probability is floored here (its log stays finite)


def _next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_positions KL(softmax(t/T) || softmax(s/T))`` in fp32 (0 exactly when t == s)."""
    T = float(temperature)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / T, dim=-1)
    s = F.log_softmax(student_logits.float().flatten(0, -2) / T, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * (T * T)


def topk_kl_divergence(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-K tokens plus one tail bucket, in fp32.

    ``student_logits`` ``(..., V)``; ``teacher_ids`` / ``teacher_logp`` ``(..., K)``: the teacher's K
    most likely tokens and their untempered log-probabilities ``log p_i``. With ``log q_i =
    s_i - logsumexp(s)`` for the student, both distributions are reduced to K + 1 outcomes, the K
    tokens and the rest (``p_rest = 1 - sum_i p_i``, ``q_rest = 1 - sum_i q_i``, floored at
    ``TAIL_FLOOR``; no bucket when ``K = V``). At temperature ``T`` both reduced distributions are
    tempered, ``log_softmax(log p / T)``, and the result is
    ``T^2 * mean_positions sum_j p_T,j (log p_T,j - log q_T,j)``. For ``K = V`` this is
    :func:`kl_divergence` exactly; for ``K < V`` and ``T = 1`` it is the KL of the reduced
    distributions, a lower bound of the full KL (equal when the student's tail is proportional to
    the teacher's).
    """
    if teacher_ids.shape != teacher_logp.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logp {tuple(teacher_logp.shape)} must be "
                         f"(..., K) over the student's positions {tuple(student_logits.shape[:-1])}")
    s = student_logits.float()
    lq = s.gather(-1, teacher_ids.long()) - torch.logsumexp(s, -1, keepdim=True)
    return _reduced_kl(teacher_logp.float(), lq, s.shape[-1], temperature)


def _reduced_kl(lp: torch.Tensor, lq: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    """:func:`topk_kl_divergence` from the two sides' log-probabilities of the K tokens."""
    if lp.shape[-1] < vocab:  # the tail bucket
        def tail(logp: torch.Tensor) -> torch.Tensor:
            return torch.log((1.0 - logp.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR))

        lp, lq = torch.cat([lp, tail(lp)], -1), torch.cat([lq, tail(lq)], -1)
    T = float(temperature)
    if T != 1.0:
        lp, lq = F.log_softmax(lp / T, -1), F.log_softmax(lq / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean() * (T * T)


class CrossEntropy:
    """Next-token cross-entropy on the batch's own tokens (the ACIP paper's task loss)."""

    name = "ce"
    uses_teacher = False

    def __call__(self, pm: Any, input_ids: torch.Tensor, **teacher: Any) -> tuple[torch.Tensor, dict[str, float]]:
        ce = _next_token_ce(pm(input_ids=input_ids).logits, input_ids)  # a cached teacher is not used
        return ce, {"ce": float(ce.detach())}

    def __repr__(self) -> str:
        return "CrossEntropy()"


class Distillation:
    """``ce_weight * CE + kd_weight * T^2 KL(teacher_T || student_T)``; the teacher is the batch's cached
    top-k (``teacher_ids`` / ``teacher_logp``) when it carries one, else ``pm.dense_view()``."""

    uses_teacher = True

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 teacher_topk: int = 0, teacher_dtype: str = "float16") -> None:
        for key, v in (("temperature", temperature), ("kd_weight", kd_weight), ("ce_weight", ce_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"objective.{key} must be a finite number >= 0, got {v!r}")
        if not temperature > 0:
            raise ValueError(f"objective.temperature must be > 0, got {temperature!r}")
        if kd_weight == 0 and ce_weight == 0:
            raise ValueError("objective.kd_weight and objective.ce_weight are both 0: the task loss would be 0")
        if isinstance(teacher_topk, bool) or not isinstance(teacher_topk, int) or teacher_topk < 0:
            raise ValueError(f"objective.teacher_topk must be an integer >= 0 (0: the dense teacher every step), "
                             f"got {teacher_topk!r}")
        from .sources import TEACHER_DTYPES

        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"objective.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {teacher_dtype!r}")
        self.temperature, self.kd_weight, self.ce_weight = float(temperature), float(kd_weight), float(ce_weight)
        # Training rows that carry no cached teacher get the base model's top-k once, before the run
        # parametrizes it (acip.train.sources.packed_teacher_topk); 0: the dense teacher forward every step.
        self.teacher_topk = int(teacher_topk) if kd_weight > 0 else 0
        self.teacher_dtype = teacher_dtype
        self.name = "kd" if ce_weight == 0 else "ce_kd"

    @torch.no_grad()
    def teacher_logits(self, pm: Any, input_ids: torch.Tensor) -> torch.Tensor:
        with pm.dense_view():
            return pm(input_ids=input_ids).logits

    def __call__(self, pm: Any, input_ids: torch.Tensor, teacher_ids: torch.Tensor | None = None,
                 teacher_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if (teacher_ids is None) != (teacher_logp is None):
            raise ValueError("the batch carries only one of teacher_ids / teacher_logp; the cached teacher needs both")
        if teacher_ids is not None:
            return self.cached(pm(input_ids=input_ids).logits, input_ids, teacher_ids, teacher_logp)
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

    def cached(self, logits: torch.Tensor, input_ids: torch.Tensor, teacher_ids: torch.Tensor,
               teacher_logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss against a cached teacher top-k: one fp32 ``logsumexp`` over the vocabulary serves
        both the CE term (``lse - s_target``) and the KD term (:func:`topk_kl_divergence`)."""
        if teacher_ids.shape[:-1] != input_ids.shape:
            raise ValueError(f"the cached teacher_ids {tuple(teacher_ids.shape)} do not cover the batch's positions "
                             f"{tuple(input_ids.shape)}")
        s = logits.float()
        lse = torch.logsumexp(s, -1, keepdim=True)
        loss = s.new_zeros(())
        parts: dict[str, float] = {}
        if self.ce_weight > 0:
            ce = (lse[:, :-1, 0] - s[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)).mean()
            loss = loss + self.ce_weight * ce
            parts["ce"] = float(ce.detach())
        if self.kd_weight > 0:
            lq = s.gather(-1, teacher_ids.long()) - lse
            kd = _reduced_kl(teacher_logp.float(), lq, s.shape[-1], self.temperature)
            loss = loss + self.kd_weight * kd
            parts["kd"] = float(kd.detach())
        return loss, parts

    def __repr__(self) -> str:
        return (f"Distillation(temperature={self.temperature}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"teacher_topk={self.teacher_topk})")
