"""Score maps: the global pruning order that one ACIP run learns.

A score map holds one float32 score per singular direction of every parametrized layer. Higher
means "keep longer". During a run, after every optimiser step::

    mask > 0                      -> score = mask value
    mask just reached <= 0        -> score = 0
    then every entry with mask <= 0 loses 1

so the earlier a direction was pruned, the lower its score, and all pruned directions rank below
all active ones (active scores are > 0, pruned ones <= -1).

A ``ScoreMap`` is data: scores, shapes, bias flags, method, stop ratio, and the
:class:`~acip.core.config.ACIPConfig` of the parametrization it belongs to (with its digest). It
holds no model and no file location; ``acip.export`` pairs it with a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import torch

from .allocation import RankAllocator
from .config import ACIPConfig, BaseSource, ConfigError, LoraSettings
from .io import ArtifactError, read_tensors, save_tensors
from .size import check_ratio

__all__ = ["ScoreMap", "ScoreMapError", "FORMAT"]

FORMAT = "acip.score_map/2"
LEGACY_FORMAT = "acip.score_map/1"


class ScoreMapError(ValueError):
    """A score map that cannot be used: missing, corrupted, or made for another model."""


class _Parametrized(Protocol):  # what a score map needs from a parametrized model (duck-typed)
    acip_config: ACIPConfig

    def svd_layers(self) -> dict[str, Any]: ...

    def masks(self) -> dict[str, torch.Tensor]: ...


class ScoreMap:
    """Per-layer score vectors plus what identifies the parametrization they belong to.

    ``shapes[name] = (out, in)``; ``scores[name]`` has ``min(out, in)`` float32 entries.
    ``config`` is the :class:`ACIPConfig` of the parametrized model (None for a hand-made map);
    ``meta`` is free-form run information (updates, global step).
    """

    def __init__(
        self,
        scores: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, int]],
        biases: dict[str, bool],
        *,
        method: str,
        stop_ratio: float | None = None,
        config: ACIPConfig | None = None,
        meta: dict | None = None,
    ) -> None:
        if not isinstance(scores, dict) or not scores:
            raise ScoreMapError("a score map needs at least one layer (a dict name -> 1-d tensor)")
        missing = [n for n in scores if n not in shapes or n not in biases]
        if missing:
            raise ScoreMapError(f"layers {missing[:5]} have scores but no shape or bias flag")
        if not isinstance(method, str) or not method:
            raise ScoreMapError(f"method must be a non-empty string, got {method!r}")
        if config is not None and not isinstance(config, ACIPConfig):
            raise ScoreMapError(f"config must be an ACIPConfig or None, got {type(config).__name__}")
        if config is not None and config.layers is not None and list(config.layers) != list(scores):
            raise ScoreMapError("the score map's layers differ from its config's layers: "
                                f"{sorted(set(config.layers) ^ set(scores))[:5]}")
        for name, s in scores.items():
            if not isinstance(s, torch.Tensor):
                raise ScoreMapError(f"layer {name!r}: scores must be a tensor, got {type(s).__name__}")
            try:
                out_f, in_f = (int(v) for v in shapes[name])
            except (TypeError, ValueError):
                raise ScoreMapError(f"layer {name!r}: shape must be (out, in), got {shapes[name]!r}") from None
            if out_f <= 0 or in_f <= 0 or not isinstance(biases[name], bool):
                raise ScoreMapError(f"layer {name!r}: bad shape {shapes[name]!r} or bias flag {biases[name]!r}")
            if s.ndim != 1 or s.numel() != min(out_f, in_f):
                raise ScoreMapError(
                    f"layer {name!r}: expected {min(out_f, in_f)} scores for shape {(out_f, in_f)}, "
                    f"got a tensor of shape {tuple(s.shape)}"
                )
        self.scores = {n: s.detach().to(torch.float32).cpu().clone() for n, s in scores.items()}
        self.shapes = {n: (int(shapes[n][0]), int(shapes[n][1])) for n in scores}
        self.biases = {n: bool(biases[n]) for n in scores}
        self.method = method
        try:
            self.stop_ratio = None if stop_ratio is None else check_ratio(stop_ratio, "stop_ratio", include_one=False)
        except ValueError as e:
            raise ScoreMapError(str(e)) from None
        self.config = config
        self.meta = dict(meta or {})
        self._alloc: RankAllocator | None = None

    @property
    def source(self) -> BaseSource | None:
        """Where the base model comes from (from the config), or None."""
        return None if self.config is None else self.config.source

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _from_layers(cls, pmodel: _Parametrized, scores: dict, method: str, **kw: Any) -> "ScoreMap":
        layers = pmodel.svd_layers()
        return cls(
            scores,
            {n: (l.out_features, l.in_features) for n, l in layers.items()},
            {n: l.bias is not None for n, l in layers.items()},
            method=method, config=pmodel.acip_config, **kw,
        )

    @classmethod
    def from_singular_values(cls, pmodel: _Parametrized) -> "ScoreMap":
        """The no-training baseline: ``score_j = s_j / ||s||_2`` per layer.

        Normalising by the layer's Frobenius norm ``||W||_F = ||s||_2`` makes scores comparable
        across layers: ``score_j^2`` is the share of the layer's energy carried by direction j,
        so the global order drops the directions that hold the least relative energy first.
        In the activation-aware basis the singular values are those of ``W L``.
        """
        scores = {}
        for n, l in pmodel.svd_layers().items():
            s = l.singular_values.float()
            scores[n] = s / s.norm().clamp_min(1e-30)
        method = "activation_aware" if pmodel.acip_config.basis == "activation_aware" else "singular_values"
        return cls._from_layers(pmodel, scores, method)

    @classmethod
    def from_masks(cls, pmodel: _Parametrized, method: str = "acip", **kw: Any) -> "ScoreMap":
        """Start a run's score map: scores = current mask values (entries <= 0 get the rule's value)."""
        sm = cls._from_layers(
            pmodel, {n: torch.zeros(l.max_rank) for n, l in pmodel.svd_layers().items()}, method, **kw
        )
        sm.update(pmodel.masks())
        return sm

    # ------------------------------------------------------------------ the update rule
    @torch.no_grad()
    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Apply the update rule after one optimiser step (see module docstring).

        An entry "just reached <= 0" when its score is still positive (it was active at the last
        update); entries already pruned keep counting down.
        """
        for name, m in masks.items():
            s = self.scores[name]
            m = m.detach().float().cpu()
            active = m > 0
            just_pruned = ~active & (s > 0)
            s[active] = m[active]
            s[just_pruned] = 0.0
            s[~active] -= 1.0
        self._alloc = None

    @torch.no_grad()
    def set_scores(self, scores: dict[str, torch.Tensor]) -> None:
        """Replace every layer's scores (e.g. when restoring a checkpoint); shapes are checked."""
        if set(scores) != set(self.scores):
            raise ScoreMapError(f"set_scores needs exactly the layers {self.names[:3]}..., got {list(scores)[:3]}...")
        for n, s in scores.items():
            if s.shape != self.scores[n].shape:
                raise ScoreMapError(f"{n}: {tuple(s.shape)} scores given, {tuple(self.scores[n].shape)} expected")
            self.scores[n] = s.detach().to(torch.float32).cpu().clone()
        self._alloc = None

    # ------------------------------------------------------------------ allocation
    @property
    def names(self) -> list[str]:
        return list(self.scores)

    def allocator(self) -> RankAllocator:
        if self._alloc is None:
            names = self.names
            self._alloc = RankAllocator.build(
                names, [self.scores[n] for n in names], [self.shapes[n] for n in names],
                [self.biases[n] for n in names],
            )
        return self._alloc

    def ranks_for(self, ratio: float, warn: bool = True, lift: bool | Collection[str] = True) -> dict[str, int]:
        """Exact per-layer ranks: the longest prefix of the global order whose cost fits ``ratio``.

        Layers in ``lift`` (default: all) that the prefix takes past their break-even rank are
        stored dense and keep all their directions (see :meth:`RankAllocator.ranks`); pass
        ``model.liftable_layers()`` for a parametrized model with trained adapters. Monotone in
        ``ratio``. Warns when ``ratio`` is below the ratio the run was trained down to (those
        directions were never scored by training: their order is a guess).
        """
        ratio = check_ratio(ratio)
        if warn and self.stop_ratio is not None and ratio < self.stop_ratio - 1e-9:
            warnings.warn(
                f"ratio={ratio} is below the stop ratio {self.stop_ratio} this score map was trained "
                f"down to; directions pruned after the run ended keep their last score, so the order "
                f"below {self.stop_ratio} is not learned. Train with a lower stop_ratio for better "
                f"results there.",
                stacklevel=2,
            )
        return self.allocator().ranks(ratio, lift)

    def keep_indices(self, ranks: dict[str, int]) -> dict[str, torch.Tensor]:
        """Per layer, the indices of its ``r`` best-scored directions (sorted ascending)."""
        alloc = self.allocator()
        out = {}
        for l, name in enumerate(alloc.names):
            out[name] = torch.sort(alloc.order_in_layer[l][: ranks[name]]).values
        return out

    # ------------------------------------------------------------------ compatibility
    def digest(self) -> str:
        """SHA-256 over layer names and the exact float32 bytes of the scores (order as stored)."""
        h = hashlib.sha256()
        for name, s in self.scores.items():
            h.update(name.encode())
            h.update(s.contiguous().numpy().tobytes())
        return h.hexdigest()

    def check_compatible(self, pmodel: _Parametrized) -> None:
        """Raise :class:`ScoreMapError` unless ``pmodel`` has exactly this map's layers, shapes and basis."""
        layers = pmodel.svd_layers()
        problems = []
        for n in self.scores:
            if n not in layers:
                problems.append(f"{n}: in the score map but not in the model")
            elif (layers[n].out_features, layers[n].in_features) != self.shapes[n]:
                got = (layers[n].out_features, layers[n].in_features)
                problems.append(f"{n}: shape {self.shapes[n]} in the score map, {got} in the model")
            elif (layers[n].bias is not None) != self.biases[n]:
                problems.append(f"{n}: bias={self.biases[n]} in the score map, {layers[n].bias is not None} in the model")
        problems += [f"{n}: in the model but not in the score map" for n in layers if n not in self.scores]
        cfg = getattr(pmodel, "acip_config", None)
        if not problems and self.config is not None and isinstance(cfg, ACIPConfig):
            if self.config.basis != cfg.basis:
                problems.append(f"basis {self.config.basis!r} in the score map, {cfg.basis!r} in the model")
        if problems:
            src = self.source.model if self.source is not None else None
            raise ScoreMapError(
                f"this score map (for {src or 'an unknown model'!r}) does not match the model: "
                f"{len(problems)} mismatches, first: " + "; ".join(problems[:5])
                + ". Use the score map made for this model, or pass model= the model it was made for."
            )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file atomically: scores as tensors, the rest in the header,
        every tensor and the header covered by sha256 (:func:`acip.core.io.save_tensors`)."""
        from .._version import __version__

        header = {
            "format": FORMAT,
            "acip_version": __version__,
            "method": self.method,
            "stop_ratio": json.dumps(self.stop_ratio),
            "config": json.dumps(None if self.config is None else self.config.to_dict()),
            "meta": json.dumps(self.meta),
            "layers": json.dumps([[n, list(self.shapes[n]), self.biases[n]] for n in self.scores]),
        }
        return save_tensors(path, self.scores, header)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "ScoreMap":
        """Read a score map written by :meth:`save` (one read; digests checked unless ``verify=False``).

        A directory means its ``score_map.safetensors``. Files of the previous format
        (``acip.score_map/1``, no digests) load with a warning; ``ScoreMap.load(p).save(p)``
        converts them.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "score_map.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"no score map at {str(path)!r}. Pass the score_map.safetensors file of a finished "
                f"run (or the run directory that holds it)."
            )
        try:
            tensors, header = read_tensors(path, verify=verify, what="score map", require_digests=False)
        except ArtifactError as e:
            raise ScoreMapError(f"score map {e}. Re-create it from the run's last checkpoint or re-run training.") from e
        fmt = header.get("format")
        if fmt not in (FORMAT, LEGACY_FORMAT):
            raise ScoreMapError(
                f"{str(path)!r} is a safetensors file but not an acip score map "
                f"(format={fmt!r}, expected {FORMAT!r})."
            )
        try:
            layers = json.loads(header["layers"])
            shapes = {n: tuple(s) for n, s, _ in layers}
            biases = {n: b for n, _, b in layers}
            scores = {n: tensors[n] for n, _, _ in layers}
            if set(tensors) != set(scores):
                raise KeyError(f"tensors {sorted(set(tensors) - set(scores))[:3]} are not in the layer list")
            if fmt == LEGACY_FORMAT:
                config, meta = _legacy_config(header), json.loads(header["meta"])
                warnings.warn(f"{str(path)!r} is a score map of the previous format (no checksums); it loads "
                              f"unverified. Convert it: acip.ScoreMap.load(p).save(p)", stacklevel=2)
            else:
                raw = json.loads(header["config"])
                config, meta = (None if raw is None else ACIPConfig.from_dict(raw)), json.loads(header["meta"])
            if not isinstance(meta, dict):
                raise TypeError(f"meta must be a JSON object, got {type(meta).__name__}")
            sm = cls(scores, shapes, biases, method=header["method"], stop_ratio=json.loads(header["stop_ratio"]),
                     config=config, meta=meta)
        except ScoreMapError as e:
            raise ScoreMapError(f"score map {str(path)!r}: {e}") from None
        except (KeyError, json.JSONDecodeError, TypeError, ValueError, AttributeError, ConfigError) as e:
            raise ScoreMapError(f"score map {str(path)!r} has a damaged header ({type(e).__name__}: {e}).") from None
        sm.meta.setdefault("acip_version", header.get("acip_version"))
        return sm

    def __repr__(self) -> str:
        n = sum(s.numel() for s in self.scores.values())
        return (
            f"ScoreMap(method={self.method!r}, layers={len(self.scores)}, directions={n}, "
            f"stop_ratio={self.stop_ratio}, source={None if self.source is None else self.source.model!r})"
        )


def _legacy_config(header: dict) -> ACIPConfig:
    """The ACIPConfig of a format-1 score map (settings in ``meta["parametrize"]``, ``source``)."""
    meta = json.loads(header["meta"])
    settings = dict(meta.get("parametrize") or {})
    src = json.loads(header.get("source") or "{}") or {}
    return ACIPConfig(
        target_modules=settings.get("target_modules") or "all-linear",
        exclude_modules=settings.get("exclude_modules"),
        mask_scaling=settings.get("mask_scaling", 2e-2),
        lora=LoraSettings.from_any(settings.get("lora")),
        svd_dtype=settings.get("svd_dtype", "float64"),
        basis="activation_aware" if meta.get("whitening") else "plain",
        source=BaseSource(model=src.get("model"), kind=src.get("kind", "object"), dtype=src.get("dtype", "float32")),
        layers=settings.get("layers"),
    )
