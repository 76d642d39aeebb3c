"""Score maps: the global pruning order that one ACIP run learns.

A score map holds one float32 score per singular direction of every parametrized layer. Higher
means "keep longer". During a run, after every optimiser step (DESIGN.md)::

    mask > 0                      -> score = mask value
    mask just reached <= 0        -> score = 0
    then every entry with mask <= 0 loses 1

so the earlier a direction was pruned, the lower its score, and all pruned directions rank below
all active ones (active scores are > 0, pruned ones <= -1).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .allocation import RankAllocator

if TYPE_CHECKING:
    from .parametrize import ACIPModel

__all__ = ["ScoreMap", "ScoreMapError", "atomic_write"]

FORMAT = "acip.score_map/1"


class ScoreMapError(ValueError):
    """A score map that cannot be used: missing, corrupted, or made for another model."""


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_ratio(ratio: float) -> float:
    """Validate a size ratio in (0, 1]."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < r <= 1.0):
        raise ValueError(
            f"ratio must be in (0, 1] (the fraction of target-layer parameters to keep), got {ratio!r}; "
            f"e.g. ratio=0.4 keeps 40%"
        )
    return r


class ScoreMap:
    """Per-layer score vectors plus the metadata needed to rebuild and check the model.

    ``shapes[name] = (out, in)``; ``scores[name]`` has ``min(out, in)`` float32 entries.
    ``source`` says where the base model comes from (see :func:`acip.load.load_base`), and
    ``meta`` carries the rest (method, stop ratio, adapters path, parametrization settings).
    """

    def __init__(
        self,
        scores: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, int]],
        biases: dict[str, bool],
        *,
        method: str,
        source: dict | None = None,
        stop_ratio: float | None = None,
        meta: dict | None = None,
    ) -> None:
        if not scores:
            raise ScoreMapError("a score map needs at least one layer")
        for name, s in scores.items():
            out_f, in_f = shapes[name]
            if s.ndim != 1 or s.numel() != min(out_f, in_f):
                raise ScoreMapError(
                    f"layer {name!r}: expected {min(out_f, in_f)} scores for shape {(out_f, in_f)}, "
                    f"got a tensor of shape {tuple(s.shape)}"
                )
        self.scores = {n: s.detach().to(torch.float32).cpu().clone() for n, s in scores.items()}
        self.shapes = {n: (int(shapes[n][0]), int(shapes[n][1])) for n in scores}
        self.biases = {n: bool(biases[n]) for n in scores}
        self.method = method
        self.source = dict(source or {})
        self.stop_ratio = stop_ratio
        self.meta = dict(meta or {})
        self.model: "ACIPModel | None" = None
        self.path: Path | None = None
        self._alloc: RankAllocator | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _from_layers(cls, pmodel: "ACIPModel", scores: dict, method: str, **kw: Any) -> "ScoreMap":
        layers = pmodel.svd_layers()
        sm = cls(
            scores,
            {n: (l.out_features, l.in_features) for n, l in layers.items()},
            {n: l.bias is not None for n, l in layers.items()},
            method=method,
            source=pmodel.source,
            meta={"parametrize": pmodel.settings(), **kw.pop("meta", {})},
            **kw,
        )
        return sm.bind(pmodel)

    @classmethod
    def from_singular_values(cls, pmodel: "ACIPModel") -> "ScoreMap":
        """The no-training baseline: ``score_j = s_j / ||s||_2`` per layer.

        Normalising by the layer's Frobenius norm ``||W||_F = ||s||_2`` makes scores comparable
        across layers: ``score_j^2`` is the share of the layer's energy carried by direction j,
        so the global order drops the directions that hold the least relative energy first.
        """
        scores = {}
        for n, l in pmodel.svd_layers().items():
            s = l.singular_values.float()
            scores[n] = s / s.norm().clamp_min(1e-30)
        method = "activation_aware" if getattr(pmodel, "whitening", None) else "singular_values"
        return cls._from_layers(pmodel, scores, method)

    @classmethod
    def from_masks(cls, pmodel: "ACIPModel", method: str = "acip", **kw: Any) -> "ScoreMap":
        """Start a run's score map: scores = current mask values (entries <= 0 get the rule's value)."""
        sm = cls._from_layers(
            pmodel, {n: torch.zeros(l.max_rank) for n, l in pmodel.svd_layers().items()}, method, **kw
        )
        sm.update(pmodel.masks())
        return sm

    # ------------------------------------------------------------------ the update rule
    @torch.no_grad()
    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Apply DESIGN.md's rule after one optimiser step (see module docstring).

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

    # ------------------------------------------------------------------ model binding
    def bind(self, pmodel: "ACIPModel") -> "ScoreMap":
        """Attach an in-memory parametrized model (checked against names and shapes)."""
        self.check_compatible(pmodel)
        self.model = pmodel
        return self

    def check_compatible(self, pmodel: "ACIPModel") -> None:
        layers = pmodel.svd_layers()
        problems = []
        for n in self.scores:
            if n not in layers:
                problems.append(f"{n}: in the score map but not in the model")
            elif (layers[n].out_features, layers[n].in_features) != self.shapes[n]:
                got = (layers[n].out_features, layers[n].in_features)
                problems.append(f"{n}: shape {self.shapes[n]} in the score map, {got} in the model")
        problems += [f"{n}: in the model but not in the score map" for n in layers if n not in self.scores]
        if problems:
            raise ScoreMapError(
                f"this score map (for {self.source.get('model', 'an unknown model')!r}) does not match "
                f"the model: {len(problems)} mismatches, first: " + "; ".join(problems[:5])
                + ". Use the score map made for this model, or pass model= the model it was made for."
            )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file atomically (scores as tensors, metadata in the header)."""
        from acip import __version__

        header = {
            "format": FORMAT,
            "acip_version": __version__,
            "method": self.method,
            "stop_ratio": json.dumps(self.stop_ratio),
            "source": json.dumps(self.source),
            "meta": json.dumps(self.meta),
            "layers": json.dumps(
                [[n, list(self.shapes[n]), self.biases[n]] for n in self.scores]
            ),
        }
        whitening = getattr(self.model, "whitening", None)
        if whitening:  # the activation-aware basis cannot be rebuilt without its factors
            from .whiten import save_whitening

            wname = Path(path).name.replace(".safetensors", "") + ".whitening.safetensors"
            save_whitening(whitening, Path(path).with_name(wname))
            self.meta["whitening"] = wname
            header["meta"] = json.dumps(self.meta)
        tensors = {n: s.contiguous() for n, s in self.scores.items()}
        path = atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreMap":
        """Read a score map written by :meth:`save`; clear errors for missing/corrupted files."""
        path = Path(path)
        if path.is_dir():
            path = path / "score_map.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"no score map at {str(path)!r}. Pass the score_map.safetensors file of a finished "
                f"run (or the run directory that holds it)."
            )
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ScoreMapError(
                f"score map file {str(path)!r} is truncated or corrupted ({e}). Re-export it from the "
                f"run's last checkpoint or re-run training."
            ) from None
        if header.get("format") != FORMAT:
            raise ScoreMapError(
                f"{str(path)!r} is a safetensors file but not an acip score map "
                f"(format={header.get('format')!r}, expected {FORMAT!r})."
            )
        try:
            layers = json.loads(header["layers"])
            shapes = {n: tuple(s) for n, s, _ in layers}
            biases = {n: b for n, _, b in layers}
            scores = {n: tensors[n] for n, _, _ in layers}
            sm = cls(
                scores, shapes, biases, method=header["method"],
                source=json.loads(header["source"]), stop_ratio=json.loads(header["stop_ratio"]),
                meta=json.loads(header["meta"]),
            )
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise ScoreMapError(f"score map {str(path)!r} has a damaged header ({e!r}).") from None
        sm.meta.setdefault("acip_version", header.get("acip_version"))
        sm.path = path
        return sm

    def __repr__(self) -> str:
        n = sum(s.numel() for s in self.scores.values())
        return (
            f"ScoreMap(method={self.method!r}, layers={len(self.scores)}, directions={n}, "
            f"stop_ratio={self.stop_ratio}, source={self.source.get('model')!r})"
        )
