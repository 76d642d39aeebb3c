"""acip: any-size compression of Hugging Face models.

One training run learns a score map; ``acip.export(run_dir, ratio=...)`` then truncates the
model to any size without retraining.
"""
from ._version import __version__  # noqa: E402

from .core import (  # noqa: E402
    ACIPConfig,
    ACIPModel,
    ChecksumError,
    LowRankLinear,
    ScoreMap,
    ScoreMapError,
    SVDLinear,
    activation_aware,
    parametrize,
    size_ratio,
    size_report,
)
from .core.layout import install_layout_hook  # noqa: E402
from .export import export  # noqa: E402
from .load import BUILTIN_MODELS, load, load_base  # noqa: E402
from . import data, eval  # noqa: E402,F401

install_layout_hook()

from . import quant  # noqa: E402,F401  (registers the quantized layout kinds for reloading)

__all__ = [
    "ACIPConfig", "ACIPModel", "BUILTIN_MODELS", "ChecksumError", "LowRankLinear", "ScoreMap", "ScoreMapError",
    "SVDLinear", "activation_aware", "export", "load", "load_base", "parametrize", "size_ratio", "size_report",
    "__version__",
]
