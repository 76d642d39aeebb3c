"""``adapters="auto"``: fold a run's LoRA adapters in only at the ratios where the run measured them to help.

The run's final evaluation (:class:`acip.train.callbacks.FinalEvaluation`) exports its score map
at every test ratio with and without the adapters, measures perplexity on its **validation
split** (a part of the training data's held-out split that no reported domain contains; never
the held-out evaluation domains), and records the decision in the score map's ``meta``, which
``ACIPModel.save_pretrained`` saves with the run directory::

    sm.meta["adapters_auto"]     = {"0.9": False, "0.8": False, "0.6": True, ...}
    sm.meta["adapters_auto_val"] = {"0.9": {"adapters": 61.2, "no_adapters": 40.3}, ...}   # val ppl

:func:`decide_adapters` reads it back for ``acip.export(..., adapters="auto")`` (the default):

* a ratio that was measured uses its decision; a ratio between measured ones (or above the
  largest) uses the nearest measured ratio **at or below** it; a ratio below the smallest measured
  one uses the smallest (the closest to the stop ratio, where the adapters were trained);
* without a ratio (a byte-budget export, whose ratio is chosen later): True only if every recorded
  decision is True;
* no decision recorded (a run from before this rule, a hand-built model, a baseline map): True if
  the model has trained adapters (some LoRA ``B != 0``), as in the paper; False otherwise, which
  is the same export because there is nothing to fold.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["AUTO_KEY", "VAL_KEY", "decide_adapters", "record_decision", "recorded_decisions"]

AUTO_KEY = "adapters_auto"
VAL_KEY = "adapters_auto_val"


def recorded_decisions(score_map: Any) -> dict[float, bool]:
    """``{ratio: adapters}`` recorded in ``score_map.meta`` (empty if none)."""
    raw = (getattr(score_map, "meta", None) or {}).get(AUTO_KEY) or {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"score_map.meta[{AUTO_KEY!r}] must map ratios to booleans, got {type(raw).__name__}")
    return {float(k): bool(v) for k, v in raw.items()}


def decide_adapters(pm: Any, score_map: Any, ratio: float | None) -> bool:
    """The ``adapters`` flag ``export(..., adapters="auto")`` uses for ``pm`` / ``score_map`` at ``ratio``."""
    if not pm.has_trained_adapters():
        return False  # nothing to fold in: both exports are the same
    dec = recorded_decisions(score_map)
    if not dec:
        return True
    if ratio is None:
        return all(dec.values())
    from ..core.size import check_ratio

    ratio = check_ratio(ratio)
    at_or_below = [r for r in dec if r <= ratio + 1e-9]
    return dec[max(at_or_below)] if at_or_below else dec[min(dec)]


def record_decision(score_map: Any, val: Mapping[float, Mapping[str, float]]) -> dict[str, bool]:
    """Store the decision from validation perplexities ``{ratio: {"adapters": p1, "no_adapters": p0}}``.

    Adapters are used where they give a strictly lower validation perplexity. Returns the
    decision as saved (ratio keys formatted with ``:g``).
    """
    dec = {f"{float(r):g}": bool(v["adapters"] < v["no_adapters"]) for r, v in val.items()}
    score_map.meta[AUTO_KEY] = dec
    score_map.meta[VAL_KEY] = {f"{float(r):g}": {k: float(x) for k, x in v.items()} for r, v in val.items()}
    return dec
