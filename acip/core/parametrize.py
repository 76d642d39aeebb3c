"""``parametrize(model)``: swap every target linear layer for an :class:`SVDLinear`.

The returned :class:`ACIPModel` wraps the transformers model like a peft model does: ``forward``,
``generate``, attribute access and ``config`` go to the wrapped model, while the ACIP-specific
views (masks, sizes, reversible pruning, adapters) live on the wrapper.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .svd_linear import SVDLinear

if TYPE_CHECKING:
    from .score_map import ScoreMap

__all__ = ["ACIPModel", "parametrize", "parametrize_like", "find_target_modules", "NoTargetLayersError"]

ADAPTER_FILE = "acip_adapters.safetensors"
ADAPTER_CONFIG = "acip_config.json"


class NoTargetLayersError(ValueError):
    """The model has no layer that the target/exclude patterns select."""


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _matches(name: str, patterns: str | Iterable[str]) -> bool:
    """A string pattern is a full-match regex; a list matches names equal to or ending in ``.item``."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_target_modules(
    model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
) -> list[str]:
    """Names of the layers to parametrize, in module order.

    ``"all-linear"`` selects every ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output
    embedding (lm_head) and anything inside an embedding module. A list selects layers whose name
    equals or ends with one of its items (``["q_proj", "v_proj"]``); a string is a regex that must
    match the whole name.
    """
    skip: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        skip.add(id(out_emb))
    names = []
    for name, mod in model.named_modules():
        if not name or id(mod) in skip:
            continue
        if target_modules == "all-linear":
            if not _is_linear_like(mod):
                continue
        elif not _matches(name, target_modules):
            continue
        if exclude_modules and _matches(name, exclude_modules):
            continue
        if not _is_linear_like(mod):
            raise TypeError(
                f"target module {name!r} is a {type(mod).__name__}, not nn.Linear; acip only "
                f"parametrizes linear layers. Narrow target_modules or add it to exclude_modules."
            )
        names.append(name)
    if not names:
        raise NoTargetLayersError(
            f"no target layers in {type(model).__name__} for target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r}. Linear layers present: "
            f"{[n for n, m in model.named_modules() if _is_linear_like(m)][:8]}. "
            f"Use target_modules='all-linear' or list names that exist."
        )
    return names


class ACIPModel(nn.Module):
    """A transformers model whose target linears are :class:`SVDLinear` layers."""

    def __init__(self, model: nn.Module, layer_names: list[str], settings: dict, source: dict) -> None:
        super().__init__()
        self.model = model
        self._layer_names = list(layer_names)
        self._settings = dict(settings)
        self.source = dict(source)
        self.whitening: dict[str, torch.Tensor] | None = None  # activation-aware basis, if any

    # ------------------------------------------------------------------ behave like the model
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # ------------------------------------------------------------------ views
    def settings(self) -> dict:
        """The arguments that rebuild this parametrization (exact layer names included)."""
        return {**self._settings, "layers": list(self._layer_names)}

    def svd_layers(self) -> dict[str, SVDLinear]:
        return {n: self.model.get_submodule(n) for n in self._layer_names}

    def masks(self) -> dict[str, nn.Parameter]:
        return {n: l.mask for n, l in self.svd_layers().items()}

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.masks().values())

    def lora_parameters(self) -> list[nn.Parameter]:
        out = []
        for l in self.svd_layers().values():
            if l.lora_A is not None:
                out += [l.lora_A, l.lora_B]
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def active_ranks(self) -> dict[str, int]:
        return {n: l.active_rank() for n, l in self.svd_layers().items()}

    def size_ratio(self, full: bool = False) -> float:
        """Parameters at the current active ranks / dense parameters.

        ``full=False``: target layers only, ``sum_l cost_l(r_l) / sum_l (in_l*out_l + bias_l)``.
        ``full=True``: the whole model, every other (unique) parameter counted as is, LoRA excluded
        (it is folded into the factors on export).
        """
        layers = self.svd_layers()
        now = sum(l.cost(l.active_rank()) for l in layers.values())
        dense = sum(l.dense_cost() for l in layers.values())
        if not full:
            return now / dense
        own = {id(p) for l in layers.values() for p in l.parameters()}  # masks, LoRA
        rest = sum(p.numel() for p in self.model.parameters() if id(p) not in own)
        return (rest + now) / (rest + dense)

    # ------------------------------------------------------------------ reversible pruning
    @torch.no_grad()
    def prune(self, ratio: float, score_map: "ScoreMap | None" = None) -> dict[str, int]:
        """Keep only each layer's best-scored directions at ``ratio`` (masks untouched).

        Uses ``score_map`` (default: the singular-value baseline). Undo with :meth:`unprune`.
        Returns the ranks.
        """
        from .score_map import ScoreMap

        sm = score_map if score_map is not None else ScoreMap.from_singular_values(self)
        sm.check_compatible(self)
        ranks = sm.ranks_for(ratio, lift=self.liftable_layers())
        keep = sm.keep_indices(ranks)
        for n, l in self.svd_layers().items():
            k = torch.zeros(l.max_rank, dtype=torch.bool, device=l.mask.device)
            k[keep[n].to(k.device)] = True
            l.keep = k
        return ranks

    def liftable_layers(self) -> set[str]:
        """Layers without a trained adapter (no LoRA, or ``B == 0``): stored dense, they keep full ``W``.

        A layer whose adapter was trained while its low-score directions were pruned is excluded:
        restoring those directions next to an adapter that compensates for them double-counts
        (held-out KJV ppl 803 instead of 83 at ratio 0.9 on the quickstart run).
        """
        return {n for n, l in self.svd_layers().items() if l.lora_B is None or not bool(l.lora_B.detach().any())}

    def unprune(self) -> None:
        for l in self.svd_layers().values():
            l.keep = None

    # ------------------------------------------------------------------ adapters
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Masks and LoRA factors: everything a run trains."""
        out = {}
        for n, l in self.svd_layers().items():
            out[f"{n}.mask"] = l.mask.detach().cpu().contiguous()
            if l.lora_A is not None:
                out[f"{n}.lora_A"] = l.lora_A.detach().cpu().contiguous()
                out[f"{n}.lora_B"] = l.lora_B.detach().cpu().contiguous()
        return out

    def save_adapters(self, path: str | os.PathLike) -> Path:
        """Write masks + LoRA (``acip_adapters.safetensors``) and ``acip_config.json`` atomically."""
        from .score_map import atomic_write

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.adapter_state()
        atomic_write(path / ADAPTER_FILE, lambda tmp: save_file(state, tmp))
        cfg = {"settings": self.settings(), "source": self.source}
        atomic_write(path / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
        return path

    @torch.no_grad()
    def load_adapters(self, path: str | os.PathLike) -> None:
        """Load what :meth:`save_adapters` wrote; shapes and names are checked."""
        f = Path(path) / ADAPTER_FILE if Path(path).is_dir() else Path(path)
        if not f.is_file():
            raise FileNotFoundError(f"no adapters at {str(f)!r}; expected a directory with {ADAPTER_FILE}")
        try:
            state = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"adapter file {str(f)!r} is truncated or corrupted ({e})") from None
        layers = self.svd_layers()
        for key, t in state.items():
            name, _, attr = key.rpartition(".")
            if name not in layers:
                raise ValueError(f"adapter file {str(f)!r} has {key!r}, but the model has no layer {name!r}")
            l = layers[name]
            if attr == "lora_A" and l.lora_A is None:
                raise ValueError(
                    f"adapter file has LoRA weights for {name!r} but the model was parametrized "
                    f"without LoRA; parametrize with the same lora= config"
                )
            dst = getattr(l, attr)
            if dst.shape != t.shape:
                raise ValueError(f"{key}: shape {tuple(t.shape)} in file, {tuple(dst.shape)} in model")
            dst.copy_(t)


def parametrize(
    model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    mask_scaling: float = 2e-2,
    lora: Any = None,
    svd_dtype: torch.dtype = torch.float64,
    whitening: dict[str, torch.Tensor] | None = None,
) -> ACIPModel:
    """Replace every target linear layer of ``model`` by its exact SVD parametrization.

    The model is changed in place (its layers are swapped) and wrapped. All original parameters
    are frozen; the masks (and LoRA factors when ``lora`` is a ``peft.LoraConfig`` or a dict
    with ``r``, ``lora_alpha``, ``lora_dropout``) are trainable. Outputs are unchanged up to
    the SVD's round-off (relative error ~1e-7 in fp32). ``whitening`` (layer name -> Cholesky
    factor, from :func:`acip.core.whiten.calibrate_whitening`) gives the activation-aware basis.
    """
    from tqdm.auto import tqdm

    if isinstance(model, ACIPModel):
        raise TypeError("this model is already parametrized; pass the original transformers model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"parametrize expects a torch nn.Module (a transformers model), got {type(model).__name__}")
    if not (isinstance(mask_scaling, (int, float)) and mask_scaling > 0):
        raise ValueError(f"mask_scaling must be a positive number, got {mask_scaling!r} (the paper uses 2e-2)")
    lora_cfg = _lora_dict(lora)
    names = find_target_modules(model, target_modules, exclude_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in tqdm(names, desc="SVD", disable=len(names) < 50, leave=False):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lw = None
        if whitening is not None:
            if name not in whitening:
                raise ValueError(f"whitening factors have no entry for layer {name!r}; calibrate with the same targets")
            lw = whitening[name]
        layer = SVDLinear.from_linear(getattr(parent, child), mask_scaling, svd_dtype, whitening=lw)
        if lora_cfg:
            layer.add_lora(lora_cfg["r"], lora_cfg["lora_alpha"], lora_cfg["lora_dropout"])
        setattr(parent, child, layer)
    settings = {
        "target_modules": target_modules,
        "exclude_modules": exclude_modules,
        "mask_scaling": float(mask_scaling),
        "lora": lora_cfg,
        "svd_dtype": str(svd_dtype).replace("torch.", ""),  # rebuild with the same SVD
    }
    source = dict(getattr(model, "acip_source", None) or {"model": None, "kind": "object"})
    pm = ACIPModel(model, names, settings, source)
    pm.whitening = whitening
    return pm


def parametrize_like(
    model: nn.Module, settings: dict, whitening: dict[str, torch.Tensor] | None = None
) -> ACIPModel:
    """Parametrize ``model`` exactly as described by ``ACIPModel.settings()`` (saved with runs)."""
    return parametrize(
        model,
        target_modules=settings.get("layers", settings.get("target_modules", "all-linear")),
        exclude_modules=None if "layers" in settings else settings.get("exclude_modules"),
        mask_scaling=settings.get("mask_scaling", 2e-2),
        lora=settings.get("lora"),
        svd_dtype=getattr(torch, settings.get("svd_dtype", "float64")),
        whitening=whitening,
    )


def _lora_dict(lora: Any) -> dict | None:
    if lora is None:
        return None
    if isinstance(lora, dict):
        d = dict(lora)
    else:  # peft.LoraConfig or any object with these attributes
        d = {k: getattr(lora, k) for k in ("r", "lora_alpha", "lora_dropout") if hasattr(lora, k)}
    d.setdefault("lora_alpha", d.get("r", 0))
    d.setdefault("lora_dropout", 0.0)
    if not isinstance(d.get("r"), int) or d["r"] <= 0:
        raise ValueError(f"LoRA config needs a positive integer rank r, got {d.get('r')!r}")
    return {"r": int(d["r"]), "lora_alpha": float(d["lora_alpha"]), "lora_dropout": float(d["lora_dropout"])}
