"""The ACIP schedule: the L1 weight, the stop-ratio switch and post-tuning, as one small object.

For optimiser step ``t`` (0-based) the loss is ``CE + lambda_t * sum_l ||ReLU(m_l)||_1`` with

    lambda_t = l1_init * reg_factor ** floor(t / reg_every)

The ``acip`` phase ends after the first step whose size ratio (target layers, active ranks) is
``<= stop_ratio``: with ``post_tune_steps > 0`` the run switches to ``post_tune`` (masks frozen,
adapters train, no L1 term) for exactly that many steps, else it stops. ``max_steps`` caps the
``acip`` phase (the run then stops without having reached the ratio, and says so).

Post-tuning with the ratio sampled per step (``post_tune_ratios=[lo, hi]``, or ``"uniform"`` for
``[stop_ratio, 1.0]``): before post-tune step ``t`` (0-based global step count) the model is pruned
to

    rho_t = lo + (hi - lo) * u_t,   u_t ~ U[0, 1) drawn from numpy's generator seeded by (seed, t)

with the run's score map, so the adapters learn to help at every ratio in ``[lo, hi]`` rather than
at the stop ratio only. ``rho_t`` depends on nothing but ``(seed, t)``: a resumed run sees the same
ratios (:func:`sampled_ratio`).

:class:`ACIPSchedule` holds the knobs and the state (phase, stop step, post-tune start, score
updates); it decides, :class:`acip.train.module.ACIPModule` acts. Being a function of the step
count and of the measured ratio, it resumes exactly from its :meth:`state_dict`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

from acip.core.size import check_ratio

__all__ = ["ACIPSchedule", "l1_weight_at", "sampled_ratio", "check_ratio_bounds"]

PHASES = ("acip", "post_tune")


def l1_weight_at(step: int, l1_init: float, reg_factor: float, reg_every: int) -> float:
    """``lambda_t = l1_init * reg_factor ** floor(step / reg_every)`` for 0-based step ``t``."""
    return float(l1_init) * float(reg_factor) ** (int(step) // int(reg_every))


def sampled_ratio(seed: int, step: int, lo: float, hi: float) -> float:
    """``rho = lo + (hi - lo) * u``, ``u ~ U[0, 1)`` from ``numpy.random.default_rng([seed, step])``.

    A pure function of ``(seed, step)``: the same step of a resumed run (or of another process)
    draws the same ratio. ``lo == hi`` gives ``lo``.
    """
    import numpy as np

    if int(seed) < 0 or int(step) < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    u = float(np.random.default_rng([int(seed), int(step)]).random())
    return float(lo) + (float(hi) - float(lo)) * u


def check_ratio_bounds(value: Any, key: str, stop_ratio: float | None = None) -> tuple[float, float]:
    """``(lo, hi)`` from ``[lo, hi]`` (both in (0, 1], ``lo <= hi``) or ``"uniform"`` (= ``[stop_ratio, 1.0]``).

    A ValueError names ``key``, the value and the fix.
    """
    if isinstance(value, str):
        if value != "uniform":
            raise ValueError(f"{key} must be [lo, hi] (ratios in (0, 1], lo <= hi) or 'uniform', got {value!r}")
        if stop_ratio is None:
            raise ValueError(f"{key}='uniform' means [stop_ratio, 1.0] but there is no stop ratio: give the "
                             f"bounds, e.g. {key}=[0.5,1.0]")
        return float(stop_ratio), 1.0
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be [lo, hi] (ratios in (0, 1], lo <= hi) or 'uniform', got {value!r}") from None
    lo, hi = check_ratio(lo, f"{key}[0]"), check_ratio(hi, f"{key}[1]")
    if lo > hi:
        raise ValueError(f"{key}={[lo, hi]}: the lower bound is above the upper one; swap them, e.g. {key}={[hi, lo]}")
    return lo, hi


def _number(value: Any, key: str, integer: bool = False) -> float:
    """``value`` as a finite number (an int when ``integer``), else a ValueError naming ``key``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    if ok and integer and float(value) != int(value):
        ok = False
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{key} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


@dataclass
class ACIPSchedule:
    """Knobs (first eight fields) and state (the rest) of one run's schedule; see the module docstring.

    ``post_tune_ratios``: None (post-tune at the reached stop ratio, as trained) or the bounds of
    the ratio sampled per post-tune step (stored as the tuple ``(lo, hi)``); ``seed`` seeds the draws.
    """

    l1_init: float = 0.0
    reg_factor: float = 1.0
    reg_every: int = 1
    stop_ratio: float | None = None  # None: the ratio never stops the run (unit tests)
    post_tune_steps: int = 0
    max_steps: int | None = None
    post_tune_ratios: Any = None  # None, [lo, hi] or "uniform" (= [stop_ratio, 1.0]); see sampled_ratio
    seed: int = 0
    phase: str = "acip"
    stop_step: int | None = None  # step count after which the stop ratio was reached
    reached_ratio: float | None = None
    post_tune_start: int = -1  # step count at the switch to post_tune
    updates: int = 0  # score-map updates applied

    def __post_init__(self) -> None:
        self.l1_init = _number(self.l1_init, "acip.l1_init")
        self.reg_factor = _number(self.reg_factor, "acip.reg_factor")
        self.reg_every = _number(self.reg_every, "acip.reg_every", integer=True)
        self.post_tune_steps = _number(self.post_tune_steps, "acip.post_tune_steps", integer=True)
        if self.l1_init < 0 or self.reg_factor <= 0 or self.reg_every < 1:
            raise ValueError(
                f"bad schedule acip.l1_init={self.l1_init}, acip.reg_factor={self.reg_factor}, "
                f"acip.reg_every={self.reg_every}: need l1_init >= 0, reg_factor > 0 (e.g. 1.01) and "
                f"reg_every >= 1 steps"
            )
        if self.post_tune_steps < 0:
            raise ValueError(f"acip.post_tune_steps must be >= 0, got {self.post_tune_steps}")
        if self.stop_ratio is not None:
            self.stop_ratio = check_ratio(self.stop_ratio, "acip.stop_ratio", include_one=False)
        if self.max_steps is not None:
            self.max_steps = _number(self.max_steps, "acip.max_steps", integer=True)
            if self.max_steps < 1:
                raise ValueError(f"acip.max_steps must be >= 1, got {self.max_steps}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        self.seed = _number(self.seed, "seed", integer=True)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.post_tune_ratios is not None:
            if self.post_tune_steps < 1:
                raise ValueError(f"acip.post_tune_ratios={self.post_tune_ratios!r} samples the ratio of each "
                                 f"post-tune step, but acip.post_tune_steps=0: set acip.post_tune_steps > 0 (e.g. "
                                 f"50) or acip.post_tune_ratios=null")
            self.post_tune_ratios = check_ratio_bounds(self.post_tune_ratios, "acip.post_tune_ratios",
                                                       self.stop_ratio)

    @classmethod
    def from_config(cls, a: Any, seed: int = 0) -> "ACIPSchedule":
        """The schedule of a config's ``acip:`` section (a mapping; ``post_tune_ratios`` optional)."""
        get = a.get if hasattr(a, "get") else (lambda k, d=None: getattr(a, k, d))
        ratios = get("post_tune_ratios", None)
        if ratios is not None and not isinstance(ratios, str):
            ratios = list(ratios)  # an omegaconf ListConfig
        return cls(l1_init=get("l1_init"), reg_factor=get("reg_factor"), reg_every=get("reg_every"),
                   stop_ratio=get("stop_ratio"), post_tune_steps=get("post_tune_steps"), max_steps=get("max_steps"),
                   post_tune_ratios=ratios, seed=seed)

    def post_tune_ratio(self, step: int) -> float | None:
        """The ratio to prune to for the step taken after ``step`` optimiser steps: ``rho_step`` (see
        :func:`sampled_ratio`) in the ``post_tune`` phase with ``post_tune_ratios`` set, else None."""
        if self.phase != "post_tune" or self.post_tune_ratios is None:
            return None
        return sampled_ratio(self.seed, step, *self.post_tune_ratios)

    @property
    def total_steps(self) -> int | None:
        """The most optimiser steps a run can take: ``max_steps + post_tune_steps``."""
        return None if self.max_steps is None else self.max_steps + self.post_tune_steps

    def l1_weight_at(self, step: int) -> float:
        return l1_weight_at(step, self.l1_init, self.reg_factor, self.reg_every)

    def post_tune_done(self, step: int) -> int:
        """Post-tune steps taken after ``step`` optimiser steps (0 in the ``acip`` phase)."""
        return 0 if self.phase != "post_tune" else int(step) - self.post_tune_start

    def advance(self, step: int, size_ratio: float) -> str:
        """Decide after optimiser step number ``step`` (1-based count), given its size ratio.

        Returns ``"post_tune"`` (switch now), ``"stop"`` (end the run) or ``"continue"``. Steps
        (b) and (c) of :meth:`ACIPModule.after_step`: the stop check, then the post-tune count,
        so a run with ``post_tune_steps`` switches at step S and stops after step S + post_tune_steps.
        """
        action = "continue"
        if self.phase == "acip":
            if self.stop_ratio is not None and size_ratio <= self.stop_ratio:
                self.stop_step, self.reached_ratio = int(step), float(size_ratio)
                if self.post_tune_steps > 0:
                    self.phase, self.post_tune_start, action = "post_tune", int(step), "post_tune"
                else:
                    return "stop"
            elif self.max_steps is not None and step >= self.max_steps:
                warnings.warn(f"acip.max_steps={self.max_steps} steps done and the size ratio is {size_ratio:.4f}, "
                              f"above acip.stop_ratio={self.stop_ratio}: stopping without reaching it. Raise "
                              f"acip.max_steps, acip.l1_init or acip.reg_factor", stacklevel=2)
                return "stop"
        if self.phase == "post_tune" and self.post_tune_done(step) >= self.post_tune_steps:
            return "stop"
        return action

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state fields; the knobs stay as configured (a resumed run may change them)."""
        for key in ("phase", "stop_step", "reached_ratio", "post_tune_start", "updates"):
            if key in state:
                setattr(self, key, state[key])
        if self.phase not in PHASES:
            raise ValueError(f"checkpoint holds an unknown phase {self.phase!r}; expected one of {PHASES}")
