"""acip.core: the math, with torch and transformers only (no Lightning, Hydra or wandb)."""
from .allocation import RankAllocator
from .lowrank import LAYOUT_KEY, LowRankLinear, apply_layout, install_layout_hook, register_module_kind
from .parametrize import ACIPModel, NoTargetLayersError, find_target_modules, parametrize
from .score_map import ScoreMap, ScoreMapError, atomic_write, check_ratio
from .size import SizeReport, size_ratio, size_report
from .svd_linear import SVDLinear, rank_cost
from .whiten import activation_aware

__all__ = [
    "ACIPModel", "LAYOUT_KEY", "LowRankLinear", "NoTargetLayersError", "RankAllocator", "SVDLinear",
    "ScoreMap", "ScoreMapError", "SizeReport", "activation_aware", "apply_layout", "atomic_write", "check_ratio",
    "find_target_modules", "install_layout_hook", "parametrize", "rank_cost", "register_module_kind",
    "size_ratio", "size_report",
]
