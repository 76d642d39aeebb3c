"""Callbacks of an ACIP run: they observe, the module runs the algorithm (:mod:`acip.train.module`).

``Monitor`` (metrics), ``RunArtifacts`` (the run directory as one saved ACIPModel),
``FinalEvaluation`` (held-out perplexity at the test ratios, plots).
"""
from .artifacts import RunArtifacts
from .final_eval import FinalEvaluation
from .monitor import Monitor

__all__ = ["Monitor", "RunArtifacts", "FinalEvaluation"]
