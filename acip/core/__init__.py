"""acip.core: the math, with torch and transformers only (no Lightning, Hydra or wandb).

Reading order: ``svd_linear`` (one layer) -> ``parametrize`` (a model, its saved contract
``config``) -> ``allocation`` / ``score_map`` (the global order and exact ranks) -> ``acip.export``.
"""
from .allocation import RankAllocator
from .base import BUILTIN_MODELS, load_base
from .config import ACIPConfig, BaseSource, ConfigError, LoraSettings
from .io import ArtifactError, ChecksumError
from .layout import LAYOUT_KEY, install_layout_hook, register_module_kind
from .lowrank import LowRankLinear
from .parametrize import ACIPModel, BasisMismatchError, parametrize
from .score_map import ScoreMap, ScoreMapError
from .size import SizeReport, check_ratio, size_ratio, size_report
from .surgery import NoTargetLayersError, find_targets
from .svd_linear import SVDLinear
from .whiten import activation_aware, calibrate_whitening

__all__ = [
    "ACIPConfig", "ACIPModel", "ArtifactError", "BasisMismatchError", "ChecksumError", "LoraSettings",
    "LowRankLinear", "NoTargetLayersError", "SVDLinear", "ScoreMap", "ScoreMapError", "SizeReport",
    "activation_aware", "calibrate_whitening", "load_base", "parametrize", "size_ratio", "size_report",
]
