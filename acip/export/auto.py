"""``adapters="auto"``: fold a run's LoRA adapters in only at the ratios where the run measured them to help.

The run's final evaluation (:class:`acip.train.callbacks.FinalEvaluation`) exports its score map
at every test ratio with and without the adapters, measures perplexity on its **validation
split** (a part of the training data's held-out split that no reported domain contains; never
the held-out evaluation domains), and records the decision in the score map's ``meta``, which
``ACIPModel.save_pretrained`` saves with the run directory::

    sm.meta["adapters_auto"]     = {"0.9": False, "0.8": False, "0.6": True, ...}
    sm.meta["adapters_auto_val"] = {"0.9": {"adapters": 61.2, "no_adapters": 40.3}, ...}   # val ppl
    sm.meta["adapters_auto_val_parts"] = {"kjv": {"0.9": {...}}, "self_generated": {...}}  # data=mix

A mixture's validation split (``data=mix``: :class:`acip.train.data.LabeledTexts`) is measured
component by component as well, and the adapters are kept at a ratio only where they help on
every component (:func:`record_decision`): the pooled split would let the component with the most
tokens decide for all of them.

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

__all__ = ["AUTO_KEY", "VAL_KEY", "PARTS_KEY", "decide_adapters", "record_decision", "recorded_decisions"]

AUTO_KEY = "adapters_auto"
VAL_KEY = "adapters_auto_val"
PARTS_KEY = "adapters_auto_val_parts"


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


def record_decision(score_map: Any, val: Mapping[float, Mapping[str, float]],
                    by_part: Mapping[str, Mapping[float, Mapping[str, float]]] | None = None) -> dict[str, bool]:
    """Store the decision from validation perplexities ``{ratio: {"adapters": p1, "no_adapters": p0}}``.

    Without ``by_part`` the adapters are used where they give a strictly lower perplexity on the
    (pooled) validation split. With ``by_part = {part: {ratio: {"adapters": p1, "no_adapters": p0}}}``
    (a mixture's validation split measured component by component, each part on its own windows),
    they are used at ratio ``r`` only where they are strictly lower on **every** part:

        adapters(r) = AND_c  [ p1_c(r) < p0_c(r) ]

    The adapters are trained on the mixture as a whole, so the pooled split favours whichever part
    holds the most tokens; a part that gets worse with them is a kind of training text the
    adapters trade away, and the masks alone (no adapters) are the export that trades nothing.
    Returns the decision as saved (ratio keys formatted with ``:g``); the pooled figures go to
    ``meta[VAL_KEY]``, the per-part ones to ``meta[PARTS_KEY]``.
    """
    def helps(v: Mapping[str, float]) -> bool:
        return bool(v["adapters"] < v["no_adapters"])

    parts = {str(p): dict(d) for p, d in (by_part or {}).items()}
    for p, d in parts.items():
        missing = [f"{float(r):g}" for r in val if r not in d]
        if missing:
            raise ValueError(f"record_decision: part {p!r} has no validation perplexity at ratio(s) {missing}")
    dec = {f"{float(r):g}": helps(v) and all(helps(d[r]) for d in parts.values()) for r, v in val.items()}

    def fmt(v: Mapping[float, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        return {f"{float(r):g}": {k: float(x) for k, x in e.items()} for r, e in v.items()}

    score_map.meta[AUTO_KEY] = dec
    score_map.meta[VAL_KEY] = fmt(val)
    if parts:
        score_map.meta[PARTS_KEY] = {p: fmt(d) for p, d in parts.items()}
    else:
        score_map.meta.pop(PARTS_KEY, None)
    return dec
