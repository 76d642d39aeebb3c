"""``acip.export(score_map, ratio)``: a score map + a size ratio -> a compressed transformers model.

For each layer ``l`` the score map's exact allocation gives a rank ``r_l``; the layer keeps its
``r_l`` best-scored directions as two thin linears ``up(down(x))`` (``r*(in+out)`` params), or a
dense matrix when that is cheaper (``r*(in+out) > in*out``); a dense layer without a trained adapter
keeps all its directions (the original ``W``, at the same cost). LoRA adapters are folded in: a
low-rank layer re-truncates ``W_r + sBA`` to exactly rank ``r_l`` (see :meth:`SVDLinear.factors`);
a dense layer stores ``W_r + sBA`` as it is (:meth:`SVDLinear.dense_weight`), which is what the
trained model computed. The new model is built
from a clean copy of the config (no quantization flag) plus an ``acip_layout`` entry, so it saves
with ``save_pretrained`` (which adds a manifest of sha256 digests) and reloads with ``acip.load``
(verified) or ``AutoModel*.from_pretrained`` after ``import acip``. No input is ever modified.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.base import clean_config, load_base
from ..core.layout import LAYOUT_KEY
from ..core.parametrize import STATE_FILE, ACIPModel, parametrize
from ..core.score_map import ScoreMap, ScoreMapError
from ..core.size import check_ratio, size_report
from ..core.svd_linear import SVDLinear

__all__ = ["export", "resolve"]


def _legacy_hint(p: Path) -> str:
    return (f"{str(p)!r} is a run directory of the previous acip format (adapters/ and a score map without "
            f"its model state). Convert it once with `python -m acip.convert {p}`, then export it.")


def _from_path(p: Path, model: Any) -> ACIPModel:
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent  # a score map file inside a run directory
    if (p / STATE_FILE).is_file():
        base = copy.deepcopy(model) if isinstance(model, nn.Module) and not isinstance(model, ACIPModel) else None
        return ACIPModel.from_pretrained(p, model=base)
    if (p / "adapters").is_dir() or (p / "score_map.safetensors").is_file():
        raise ScoreMapError(_legacy_hint(p))
    if not p.exists():
        raise FileNotFoundError(f"no run or model directory at {str(p)!r}")
    raise FileNotFoundError(f"{str(p)!r} holds no {STATE_FILE}: pass a run directory or a directory written by "
                            f"ACIPModel.save_pretrained")


def _for_score_map(sm: ScoreMap, model: Any, adapters: Any) -> ACIPModel:
    """The parametrized model a bare score map is exported from (never the caller's object)."""
    cfg = sm.config
    if isinstance(model, ACIPModel):
        return model
    needs = []
    if cfg is not None and cfg.basis == "activation_aware":
        needs.append("the activation-aware basis (its whitening factors)")
    if cfg is not None and cfg.lora is not None and adapters is not False:
        needs.append("the run's trained LoRA adapters (or pass adapters=False)")
    if needs:
        raise ScoreMapError(
            f"this score map belongs to a parametrization with {' and '.join(needs)}, which a score map does not "
            f"hold. Export the run directory instead, acip.export('<run_dir>', ratio), or pass the parametrized "
            f"model: acip.export(acip.load('<run_dir>'), ratio)"
        )
    if cfg is not None and cfg.lora is not None:
        cfg = cfg.replace(lora=None)
    if model is None:
        src = cfg.source.model if cfg is not None else None
        if not src:
            raise ScoreMapError(
                "this score map does not record where its model comes from (it was made from a model "
                "object); pass the model: acip.export(score_map, ratio, model=my_model)"
            )
        base, _ = load_base(src, dtype=getattr(torch, cfg.source.dtype))
    elif isinstance(model, nn.Module):
        base = copy.deepcopy(model)  # exporting never changes an input
    else:
        raise TypeError(f"model must be a transformers model or an acip.ACIPModel, got {type(model).__name__}")
    return parametrize(base, cfg) if cfg is not None else parametrize(base)


def resolve(source: Any, model: Any = None, score_map: ScoreMap | None = None,
            adapters: Any = True) -> tuple[ACIPModel, ScoreMap]:
    """``(parametrized model, score map)`` for :func:`export`'s ``source`` (see there); checked compatible."""
    if score_map is not None and not isinstance(score_map, ScoreMap):
        raise TypeError(f"score_map must be an acip.ScoreMap, got {type(score_map).__name__}")
    if isinstance(source, (str, os.PathLike)):
        pm = _from_path(Path(source).expanduser(), model)
        sm = score_map or pm.score_map
    elif isinstance(source, ACIPModel):
        if model is not None:
            raise TypeError("pass either a parametrized model as the first argument or model=, not both")
        pm, sm = source, score_map or source.score_map
    elif isinstance(source, ScoreMap):
        if score_map is not None:
            raise TypeError("pass the score map once: as the first argument or as score_map=")
        sm = source
        pm = _for_score_map(sm, model, adapters)
    else:
        raise TypeError(f"export expects a run directory, an acip.ACIPModel or an acip.ScoreMap, got "
                        f"{type(source).__name__}; load a score map with acip.ScoreMap.load(path)")
    if sm is None:
        raise ScoreMapError("this parametrized model has no score map: train one (python -m acip.compress), or "
                            "pass score_map=acip.ScoreMap.from_singular_values(pm) for the no-training baseline")
    sm.check_compatible(pm)
    return pm, sm


def _materialize_attrs(src: nn.Module, new: nn.Module) -> None:
    """Copy plain tensor attributes (not parameters or buffers, e.g. a rotary module's
    ``original_inv_freq``) that the meta-device build left on meta from the source's module."""
    src_mods = dict(src.named_modules())
    for name, mod in new.named_modules():
        for attr, val in list(vars(mod).items()):
            if isinstance(val, torch.Tensor) and val.is_meta and attr not in ("_parameters", "_buffers"):
                ref = getattr(src_mods.get(name), attr, None)
                if not isinstance(ref, torch.Tensor) or ref.shape != val.shape:
                    raise RuntimeError(f"export cannot rebuild {name}.{attr}: the source holds no such tensor")
                setattr(mod, attr, ref.clone())


def _layout_entry(layer: SVDLinear, rank: int) -> dict:
    dense = rank * (layer.in_features + layer.out_features) > layer.in_features * layer.out_features
    return {
        "kind": "dense" if dense else "lowrank",
        "rank": int(rank),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
    }


@torch.no_grad()
def export(
    source: Any,
    ratio: float | None = None,
    *,
    model: Any = None,
    score_map: ScoreMap | None = None,
    quantize: Any = None,
    adapters: bool | str = "auto",
    size_mb: float | None = None,
    bits_per_param: float | None = None,
    calib: Any = None,
    _ranks: dict[str, int] | None = None,
) -> nn.Module:
    """Export at size ``ratio`` (fraction of target-layer parameters) as a plain transformers model.

    ``source`` is a run directory (or any directory written by ``ACIPModel.save_pretrained``),
    an :class:`ACIPModel` (its own ``score_map`` unless ``score_map=`` is given), or a
    :class:`ScoreMap` with ``model=`` the model it belongs to (a plain transformers model is
    parametrized on a copy; without ``model=`` the base model named in the map is loaded, which
    works for maps of a plain basis without adapters). Nothing passed in is changed.

    The returned model's measured ratio (``acip.size_ratio(model)``) is <= ``ratio`` and within
    one rank step of it. ``quantize`` optionally hands the result to ``acip.quant.quantize_``
    (a quantizer config, ``"entropy"`` or ``"nf4"``).

    ``size_mb`` (10^6 bytes) or ``bits_per_param`` instead of ``ratio``: a byte budget for the target
    layers; every layer's rank and quantizer rate are chosen jointly to fit it (never above, within
    3%; :mod:`acip.export.budget`), ``calib`` optional token batches for its per-layer sensitivities.
    With a budget, ``quantize`` is the entropy quantizer's settings for its quantized layers (an
    ``EntropyQuantConfig`` whose ``lam`` the budget chooses per layer, e.g.
    ``EntropyQuantConfig(fmt="uniform", rounding="gptq")`` with ``calib``).

    ``adapters=False`` exports the score map's truncation without the run's LoRA adapters: every
    layer is then untuned, so a layer stored dense keeps its full ``W``. The adapters were trained
    at the run's stop ratio; well above it they can hurt, most of all on text unlike the training
    data (docs/BENCHMARKS.md), and the run's ``results.json`` measures both.

    ``adapters="auto"`` (the default) folds them in only at the ratios where the run measured them
    to help on its validation split (recorded in ``score_map.meta["adapters_auto"]``; the nearest
    measured ratio at or below ``ratio`` decides; no record: True if the model has trained
    adapters). ``config.acip_export["adapters"]`` holds the flag used. See :mod:`acip.export.auto`.
    """
    from transformers.initialization import no_init_weights

    if size_mb is not None or bits_per_param is not None:  # byte budget: ranks and storage chosen jointly
        if ratio is not None:
            raise TypeError("a byte budget (size_mb= / bits_per_param=) chooses ranks and quantizer rates itself: "
                            "pass it without ratio=")
        from .budget import export_budget

        return export_budget(source, size_mb=size_mb, bits_per_param=bits_per_param, model=model,
                             score_map=score_map, adapters=adapters, calib=calib, quant=quantize)
    if isinstance(adapters, str) and adapters == "auto":  # the run's recorded per-ratio choice (export/auto.py)
        from .auto import decide_adapters

        pm, score_map = resolve(source, model, score_map, adapters)
        source, model = pm, None
        adapters = decide_adapters(pm, score_map, ratio)
    if ratio is None and _ranks is None:
        raise TypeError("export needs a size: ratio= (fraction of target-layer parameters), or a byte budget "
                        "size_mb= / bits_per_param=")
    ratio = None if _ranks is not None else check_ratio(ratio)
    if not isinstance(adapters, bool):
        raise TypeError(f"adapters={adapters!r}: pass \"auto\" (the run's choice per ratio), True (fold the run's "
                        f"LoRA adapters in) or False (leave them out)")
    pm, score_map = resolve(source, model, score_map, adapters)
    layers = pm.svd_layers()
    ranks = (dict(_ranks) if _ranks is not None  # explicit per-layer ranks (the byte-budget path)
             else score_map.ranks_for(ratio, lift=pm.liftable_layers() if adapters else set(layers)))
    keep = score_map.keep_indices(ranks)
    src = pm.model
    layout = {n: _layout_entry(l, ranks[n]) for n, l in layers.items()}

    config = clean_config(src.config)
    setattr(config, LAYOUT_KEY, layout)
    config.acip_export = {
        "config": pm.acip_config.to_dict(),
        "ratio": ratio,
        "method": score_map.method,
        "stop_ratio": score_map.stop_ratio,
        "adapters": adapters,
    }
    # The new model is built on the meta device: no placeholder weights are allocated (a bf16 export
    # used to allocate and convert a dense fp32 model first). Every tensor it ends up with is its
    # own: a copy of the source's tensor the export keeps, or a layer's new factors, one at a time.
    with torch.device("meta"), no_init_weights():
        new = type(src)(config)
    new.to(next(src.parameters()).dtype)

    state = {}
    prefixes = tuple(n + "." for n in layers)
    copies: dict[tuple, torch.Tensor] = {}  # tied tensors (embedding / lm_head) are copied once, stay tied
    for name, t in src.state_dict().items():
        if not name.startswith(prefixes):
            key = (t.device, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key not in copies:
                copies[key] = t.clone()  # never shared with the source (an in-place edit must not leak)
            state[name] = copies[key]
    del copies
    for name, layer in layers.items():
        idx = keep[name].to(layer.base.device)
        entry = layout[name]
        bias = None if layer.bias is None else layer.bias.clone()
        if entry["kind"] == "lowrank":
            up, down = layer.factors(idx, with_lora=adapters)
            state[f"{name}.up.weight"], state[f"{name}.down.weight"] = up.contiguous(), down.contiguous()
            if bias is not None:
                state[f"{name}.up.bias"] = bias
        else:  # stored dense: the kept directions plus the whole adapter, no re-truncation
            w = layer.dense_weight(idx, with_lora=adapters)
            target = new.get_submodule(name)
            state[f"{name}.weight"] = (w if isinstance(target, nn.Linear) else w.t()).contiguous()
            if bias is not None:
                state[f"{name}.bias"] = bias
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(new, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"export produced a state that does not fit the model: missing={missing[:5]}, unexpected={unexpected[:5]}")
    for name, buf in src.named_buffers():  # non-persistent buffers (rotary tables) are not in state_dict
        mod_name, _, leaf = name.rpartition(".")
        if name.startswith(prefixes):
            continue
        owner = new.get_submodule(mod_name) if mod_name else new
        if leaf in owner._buffers:
            owner._buffers[leaf] = buf.clone()
    _materialize_attrs(src, new)
    new.tie_weights()
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"export left tensors without values: {left[:5]}")
    new.eval()
    if getattr(src, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(src.generation_config)
    rep = size_report(new)
    new.config.acip_export["measured_ratio"] = rep.target_ratio
    new.config.acip_export["measured_full_ratio"] = rep.full_ratio
    if quantize is not None:
        from ..quant import quantize_

        quantize_(new, quantize)
    return new
