"""acip: any-size compression of Hugging Face models.

One training run learns a score map; ``acip.export(score_map, ratio=...)`` then truncates the
model to any size without retraining.
"""
__version__ = "0.1.0"

from .core import (  # noqa: E402
    ACIPModel,
    LowRankLinear,
    ScoreMap,
    ScoreMapError,
    SVDLinear,
    activation_aware,
    install_layout_hook,
    parametrize,
    size_ratio,
    size_report,
)
from .export import export  # noqa: E402
from .load import BUILTIN_MODELS, load, load_base  # noqa: E402
from . import data, eval  # noqa: E402,F401

install_layout_hook()

import importlib.util as _ilu  # noqa: E402

if _ilu.find_spec("acip.quant") is not None:  # registers quantized module kinds for reloading
    from . import quant  # noqa: F401

__all__ = [
    "ACIPModel", "BUILTIN_MODELS", "LowRankLinear", "ScoreMap", "ScoreMapError", "SVDLinear",
    "activation_aware", "export", "load", "load_base", "parametrize", "size_ratio", "size_report", "__version__",
]
