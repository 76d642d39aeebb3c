"""Callbacks of an ACIP run: each one idea, each tested on its own."""
from .final_eval import FinalEvaluation
from .monitor import Monitor
from .schedule import RegularizationSchedule
from .score_map import ScoreMapRecorder
from .stopping import PostTuning, StopAtRatio

__all__ = ["RegularizationSchedule", "StopAtRatio", "PostTuning", "ScoreMapRecorder", "Monitor", "FinalEvaluation"]
