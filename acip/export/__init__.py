"""``acip.export(score_map, ratio)``: a score map + a size ratio -> a compressed transformers model.

For each layer ``l`` the score map's exact allocation gives a rank ``r_l``; the layer keeps its
``r_l`` best-scored directions as two thin linears ``up(down(x))`` (``r*(in+out)`` params), or a
dense matrix when that is cheaper (``r*(in+out) > in*out``); a dense layer without a trained adapter
keeps all its directions (the original ``W``, at the same cost). LoRA adapters are folded in: a
low-rank layer re-truncates ``W_r + sBA`` to exactly rank ``r_l`` (see :meth:`SVDLinear.factors`);
a dense layer stores ``W_r + sBA`` as it is (:meth:`SVDLinear.dense_weight`), which is what the
trained model computed. The new model is built
from a clean copy of the config (no quantization flag) plus an ``acip_layout`` entry, so it saves
with ``save_pretrained`` and reloads with ``acip.load`` or ``AutoModel*.from_pretrained`` after
``import acip``. The source model is never modified.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.lowrank import LAYOUT_KEY
from ..core.parametrize import ACIPModel, parametrize_like
from ..core.score_map import ScoreMap, ScoreMapError, check_ratio
from ..core.size import size_report
from ..core.svd_linear import SVDLinear

__all__ = ["export", "model_for"]


def model_for(score_map: ScoreMap, model: Any = None) -> ACIPModel:
    """The parametrized model a score map belongs to.

    ``model`` (an :class:`ACIPModel`, or a plain model that gets parametrized with the score map's
    settings) wins; then the model bound in memory; then the base model named in the score map's
    source, parametrized the same way, with the run's adapters loaded.
    """
    if not isinstance(score_map, ScoreMap):
        raise TypeError(f"expected an acip.ScoreMap, got {type(score_map).__name__}; load one with acip.ScoreMap.load(path)")
    settings = score_map.meta.get("parametrize", {})

    def build(base: nn.Module) -> ACIPModel:
        whitening = None
        if score_map.meta.get("whitening"):
            from ..core.whiten import load_whitening

            wpath = Path(score_map.meta["whitening"])
            if not wpath.is_absolute() and score_map.path is not None:
                wpath = score_map.path.parent / wpath
            whitening = load_whitening(wpath)
        return parametrize_like(base, settings, whitening)

    if model is not None:
        pm = model if isinstance(model, ACIPModel) else build(model)
        score_map.check_compatible(pm)
        return pm
    if score_map.model is not None:
        return score_map.model
    src = score_map.source.get("model")
    if not src:
        raise ScoreMapError(
            "this score map does not record where its model comes from (it was made from a model "
            "object); pass the model: acip.export(score_map, ratio, model=my_model)"
        )
    from ..load import load_base

    dtype = getattr(torch, score_map.source.get("dtype", "float32"))
    base, _ = load_base(src, dtype=dtype)
    pm = build(base)
    adapters = score_map.meta.get("adapters")
    if adapters:
        path = Path(adapters)
        if not path.is_absolute() and score_map.path is not None:
            path = score_map.path.parent / path
        pm.load_adapters(path)
    elif settings.get("lora"):
        warnings.warn("the score map's run used LoRA but records no adapters; exporting without them")
    score_map.bind(pm)
    return pm


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
    score_map: ScoreMap,
    ratio: float,
    model: Any = None,
    quantize: Any = None,
    adapters: bool = True,
) -> nn.Module:
    """Export the model of ``score_map`` at size ``ratio`` (fraction of target-layer parameters).

    The returned model's measured ratio (``acip.size_ratio(model)``) is <= ``ratio`` and within
    one rank step of it. ``quantize`` optionally hands the result to ``acip.quant.apply``
    (an ``EntropyQuantConfig``, ``"entropy"`` or ``"nf4"``).

    ``adapters=False`` exports the score map's truncation without the run's LoRA adapters: every
    layer is then untuned, so a layer stored dense keeps its full ``W``. The adapters were trained
    at the run's stop ratio; well above it they can hurt, most of all on text unlike the training
    data (docs/BENCHMARKS.md), and the run's ``results.json`` measures both.
    """
    from transformers.initialization import no_init_weights

    ratio = check_ratio(ratio)
    if not isinstance(adapters, bool):
        raise TypeError(f"adapters={adapters!r}: pass True (fold the run's LoRA adapters in) or False (leave them out)")
    pm = model_for(score_map, model)
    layers = pm.svd_layers()
    ranks = score_map.ranks_for(ratio, lift=pm.liftable_layers() if adapters else set(layers))
    keep = score_map.keep_indices(ranks)
    src = pm.model
    layout = {n: _layout_entry(l, ranks[n]) for n, l in layers.items()}

    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    setattr(config, LAYOUT_KEY, layout)
    config.acip_export = {
        "ratio": ratio,
        "method": score_map.method,
        "source": score_map.source.get("model"),
        "stop_ratio": score_map.stop_ratio,
        "adapters": adapters,
    }
    with no_init_weights():
        new = type(src)(config)
    new.to(next(src.parameters()).dtype)

    state = {}
    prefixes = tuple(n + "." for n in layers)
    for name, t in src.state_dict().items():
        if not name.startswith(prefixes):
            state[name] = t.clone()
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
    new.tie_weights()
    new.eval()
    if getattr(src, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(src.generation_config)
    rep = size_report(new)
    new.config.acip_export["measured_ratio"] = rep.target_ratio
    new.config.acip_export["measured_full_ratio"] = rep.full_ratio
    if quantize is not None:
        from .. import quant

        quant.apply(new, quantize)
    return new
