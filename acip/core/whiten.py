"""Activation-aware SVD (SVD-LLM style): the calibrated baseline that ACIP is compared against.

For a target layer with calibration inputs ``X`` (tokens x in), let ``L`` be the lower Cholesky
factor of ``X^T X + eps*I``. Truncating the SVD of ``W L = U S V^T`` minimises the output error
``||(W - W_r) X^T||_F`` over rank-r matrices, and

    W = U S (V^T L^{-1}),    W_r = U_r S_r (V_r^T L^{-1}).

So the layer is parametrized with ``ortho = U / c`` and ``base = S V^T L^{-1}``; everything else
(masks, score maps, export) is unchanged. ``ScoreMap.from_singular_values`` on such a model gives
the activation-aware baseline (scores ``s_j / ||s||_2`` of ``W L``). The factors ``L`` are the
model's ``basis`` and are saved with it (:meth:`ACIPModel.save_pretrained`).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .parametrize import ACIPModel, parametrize
from .score_map import ScoreMap
from .surgery import find_targets

__all__ = ["activation_aware", "calibrate_whitening", "input_grams"]


@torch.no_grad()
def input_grams(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    share_inputs: bool = True,
    desc: str = "calibration",
) -> dict[str, torch.Tensor]:
    """``X^T X`` (in x in, float64) of each target layer's calibration inputs ``X`` (tokens x in).

    ``batches`` yields ``input_ids`` tensors, consumed one at a time (never held as a list); every
    forward runs on the model's device and the Gram matrices stay there. Layers that read the very
    same input tensor (q/k/v of one attention, gate/up of one MLP) have the same ``X``: with
    ``share_inputs`` (default) one Gram is accumulated per distinct input and the layers of a group
    get **the same tensor object** (copy it before writing to it or saving it). Two layers share
    only if the second one's forward receives the tensor object the previous target layer received,
    on every batch. ``share_inputs=False`` keeps one Gram per layer.
    """
    from tqdm.auto import tqdm

    names = find_targets(model, target_modules, exclude_modules)
    grams: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # layer -> the layer whose Gram it shares (itself if none)
    last: list = [None, None]  # [input tensor of the previous target layer, its owner]; one reference
    hooks = []

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x_in = args[0]
            key = last[1] if share_inputs and last[0] is x_in else name
            if owner.setdefault(name, key) != key:
                raise RuntimeError(f"layer {name!r} shared its input with {owner[name]!r} on an earlier batch but "
                                   f"not on this one; pass share_inputs=False")
            last[0], last[1] = x_in, key
            if key == name:
                x = x_in.detach().reshape(-1, x_in.shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.t() @ x
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(hook(n)))
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        for ids in tqdm(batches, desc=desc, leave=False):
            last[0] = last[1] = None
            model(input_ids=ids.to(device))
            last[0] = last[1] = None  # drop the reference to the last input
    finally:
        for h in hooks:
            h.remove()
    if not grams:
        raise ValueError("calibration saw no batches: pass at least one tensor of input_ids")
    return {n: grams[owner[n]] for n in names if n in owner}


@torch.no_grad()
def calibrate_whitening(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    damp: float = 1e-2,
    share_inputs: bool = True,
) -> dict[str, torch.Tensor]:
    """Cholesky factors ``L`` (in x in, float64 -> model dtype) of each target layer's ``X^T X``.

    ``batches`` yields ``input_ids`` tensors. ``damp`` adds ``damp * mean(diag)`` to the diagonal
    so that ``L`` exists even for rank-deficient activations. The Gram matrices come from
    :func:`input_grams`: with ``share_inputs`` (default) one fp64 Gram is accumulated and
    factorized per distinct input, and every layer of a group gets its own copy of that factor
    (bit-identical to calibrating each layer alone). Everything runs on the model's device.
    """
    grams = input_grams(model, batches, target_modules, exclude_modules, share_inputs)
    factors: dict[int, torch.Tensor] = {}
    out = {}
    for n, g in grams.items():
        if id(g) not in factors:
            eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            factors[id(g)] = torch.linalg.cholesky(g + damp * g.diagonal().mean().clamp_min(1e-12) * eye).float()
            out[n] = factors[id(g)]
        else:  # each layer its own tensor: shared storage would be refused by safetensors when saved
            out[n] = factors[id(g)].clone()
    return out


def activation_aware(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    svd_dtype: torch.dtype = torch.float32,
    damp: float = 1e-2,
) -> ACIPModel:
    """The activation-aware baseline in one call: calibrate, parametrize ``W L``, rank by ``s_j``.

    ``model`` is left untouched (a deep copy is parametrized). Returns the whitened
    :class:`ACIPModel` with ``score_map`` set to the baseline map, so ``acip.export(pm, ratio)``
    and ``pm.save_pretrained(dir)`` work like for any other parametrized model. ``batches`` yields
    ``input_ids`` tensors of training-domain text: quality outside that domain can collapse
    (docs/BENCHMARKS.md).
    """
    factors = calibrate_whitening(model, batches, target_modules, exclude_modules, damp)
    white = parametrize(copy.deepcopy(model), target_modules=sorted(factors), svd_dtype=svd_dtype,
                        whitening=factors)
    white.score_map = ScoreMap.from_singular_values(white)  # method "activation_aware"
    return white
