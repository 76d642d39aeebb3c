"""``ACIPConfig``: the one typed description of a parametrization, and the saved contract.

Everything needed to rebuild a parametrized model from its base model lives here: which layers
(patterns, and the exact names they resolved to), the mask scaling ``c``, the LoRA settings, the
SVD dtype, the basis (plain ``W = U S V^T`` or activation-aware ``W L = U S V^T``) and where the
base model comes from. It is written as ``acip_config.json`` in every run / model directory, in
the header of every score map, and in an export's ``config.json`` (``acip_export["config"]``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

__all__ = ["ACIPConfig", "LoraSettings", "BaseSource", "ConfigError", "CONFIG_VERSION"]

CONFIG_VERSION = 1
BASES = ("plain", "activation_aware")
SVD_DTYPES = ("float32", "float64")
SOURCE_KINDS = ("builtin", "path", "gguf", "hub", "object")


class ConfigError(ValueError):
    """An ACIPConfig field has a value acip cannot use."""


def _strict_keys(cls: type, d: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on every parametrized layer: ``y += (alpha / r) * B (A x)``."""

    r: int = field(metadata={"help": "adapter rank (> 0)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "scale numerator; 0 means alpha = r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, in [0, 1)"})

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        alpha = float(self.lora_alpha) if self.lora_alpha else float(self.r)
        object.__setattr__(self, "lora_alpha", alpha)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        object.__setattr__(self, "lora_dropout", float(self.lora_dropout))

    @classmethod
    def from_any(cls, lora: Any) -> "LoraSettings | None":
        """``None``, a dict, a ``LoraSettings`` or any object with ``r`` (e.g. ``peft.LoraConfig``)."""
        if lora is None or isinstance(lora, LoraSettings):
            return lora
        if isinstance(lora, dict):
            _strict_keys(cls, lora, "lora")
            return cls(**lora)
        if hasattr(lora, "r"):
            return cls(r=lora.r, lora_alpha=getattr(lora, "lora_alpha", 0.0) or 0.0,
                       lora_dropout=getattr(lora, "lora_dropout", 0.0) or 0.0)
        raise ConfigError(f"lora must be None, a dict with r/lora_alpha/lora_dropout or a peft.LoraConfig, got {lora!r}")


@dataclass(frozen=True)
class BaseSource:
    """Where the base model comes from (see :func:`acip.core.base.load_base`)."""

    model: str | None = field(default=None, metadata={"help": "built-in name, path or hub id; None: a model object"})
    kind: str = field(default="object", metadata={"help": "builtin | path | gguf | hub | object"})
    dtype: str = field(default="float32", metadata={"help": "dtype the base model was loaded in"})

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"source.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError(f"source.model must be a string or None, got {self.model!r}")
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ConfigError(f"source.dtype must name a torch dtype (e.g. 'float32'), got {self.dtype!r}")

    @classmethod
    def from_any(cls, src: Any) -> "BaseSource":
        if isinstance(src, BaseSource):
            return src
        if src is None:
            return cls()
        if isinstance(src, dict):
            _strict_keys(cls, src, "source")
            return cls(**src)
        raise ConfigError(f"source must be a dict or BaseSource, got {src!r}")


def _patterns(value: Any, key: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key} must be 'all-linear', a regex string or a list of names, got {value!r}")


@dataclass(frozen=True)
class ACIPConfig:
    """How a model is parametrized. Validated on construction; immutable; saved as JSON.

    ``layers`` is filled by :func:`acip.parametrize` with the exact names the patterns selected;
    a rebuild must select exactly those (else it fails, naming the differences).
    """

    target_modules: str | tuple[str, ...] = field(
        default="all-linear", metadata={"help": "'all-linear', a full-match regex, or a list of names/suffixes"})
    exclude_modules: str | tuple[str, ...] | None = field(
        default=None, metadata={"help": "same syntax as target_modules; matched layers are skipped"})
    mask_scaling: float = field(default=2e-2, metadata={"help": "c: mask init value, U is stored as U / c"})
    lora: LoraSettings | None = field(default=None, metadata={"help": "LoRA adapters on the SVD layers, or None"})
    svd_dtype: str = field(default="float64", metadata={"help": "dtype of the one-off SVD: float32 | float64"})
    basis: str = field(default="plain", metadata={"help": "plain (SVD of W) | activation_aware (SVD of W L)"})
    source: BaseSource = field(default_factory=BaseSource, metadata={"help": "where the base model comes from"})
    layers: tuple[str, ...] | None = field(default=None, metadata={"help": "resolved layer names (set by parametrize)"})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "format version of this config"})

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("target_modules", _patterns(self.target_modules, "target_modules") or "all-linear")
        set_("exclude_modules", _patterns(self.exclude_modules, "exclude_modules"))
        ms = self.mask_scaling
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not (0 < float(ms) < float("inf")):
            raise ConfigError(f"mask_scaling must be a positive finite number, got {ms!r} (the paper uses 2e-2)")
        set_("mask_scaling", float(ms))
        set_("lora", LoraSettings.from_any(self.lora))
        dt = str(self.svd_dtype).replace("torch.", "")
        if dt not in SVD_DTYPES:
            raise ConfigError(f"svd_dtype must be one of {SVD_DTYPES}, got {self.svd_dtype!r}")
        set_("svd_dtype", dt)
        if self.basis not in BASES:
            raise ConfigError(f"basis must be one of {BASES}, got {self.basis!r}")
        set_("source", BaseSource.from_any(self.source))
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
                raise ConfigError(f"layers must be a list of layer names, got {self.layers!r}")
            set_("layers", tuple(self.layers))
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"ACIPConfig version {self.version!r} is not supported by this acip (expects "
                              f"{CONFIG_VERSION}); upgrade acip")

    # ------------------------------------------------------------------ conversions
    @property
    def torch_svd_dtype(self) -> torch.dtype:
        return getattr(torch, self.svd_dtype)

    def replace(self, **changes: Any) -> "ACIPConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("target_modules", "exclude_modules", "layers"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ACIPConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        if not isinstance(d, dict):
            raise ConfigError(f"an ACIPConfig is a JSON object, got {type(d).__name__}")
        _strict_keys(cls, d, "ACIPConfig")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """sha256 of what decides the parametrized layers: names, basis, SVD dtype, c, LoRA shape.

        Not the source (the same model may be reached by a path or a built-in name) nor the
        patterns (``layers`` is what they resolved to).
        """
        key = {"layers": list(self.layers or ()), "basis": self.basis, "svd_dtype": self.svd_dtype,
               "mask_scaling": self.mask_scaling, "lora": None if self.lora is None else asdict(self.lora)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
