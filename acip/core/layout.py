"""The config-driven layout that rebuilds acip layers on load, and the one process-wide patch.

An exported model is an ordinary ``transformers`` model whose config carries ``acip_layout``:
``{module_name: {"kind": ..., ...}}``. At ``import acip`` we wrap two methods of
``transformers.PreTrainedModel``, for models whose config has a layout only:

* ``post_init``: every model built from such a config (``from_pretrained``, ``from_config``,
  ``cls(config)``) swaps the named modules for empty modules of the right shapes *before* weights
  are loaded, so the user needs no custom code beyond ``import acip``; other packages (the
  quantizer) register more kinds with :func:`register_module_kind`;
* ``save_pretrained``: the directory is written to a temporary sibling, gets
  ``acip_manifest.json`` (the sha256 of every stored tensor and of the layout,
  :func:`acip.core.io.write_manifest`) and is swapped into place, so a killed save never leaves
  a mix of two exports and ``acip.load`` can verify every tensor.

Why a patch and not transformers' registration hooks: ``AutoConfig.register`` /
``AutoModel*.register`` need a custom architecture name (the export would no longer be a plain
``LlamaForCausalLM``), and a registered ``HfQuantizer`` could carry the layout but marks the
model as quantized (``is_quantized``: ``.half()``/``.float()`` raise, the Trainer refuses it).
See docs/API.md.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .lowrank import LowRankLinear
from .surgery import replace_module

__all__ = ["LAYOUT_KEY", "register_module_kind", "apply_layout", "install_layout_hook"]

LAYOUT_KEY = "acip_layout"


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters(recurse=False):
        return p.dtype
    return None


def _build_lowrank(entry: dict, old: nn.Module) -> nn.Module:
    return LowRankLinear(
        entry["in_features"], entry["out_features"], entry["rank"], entry["bias"],
        dtype=_dtype_of(old), device=getattr(old, "weight", torch.empty(0)).device,
    )


def _build_dense(entry: dict, old: nn.Module) -> nn.Module:
    return old  # the original architecture already has the dense layer


_BUILDERS: dict[str, Callable[[dict, nn.Module], nn.Module]] = {
    "lowrank": _build_lowrank,
    "dense": _build_dense,
}


def register_module_kind(kind: str, build: Callable[[dict, nn.Module], nn.Module]) -> None:
    """Teach the layout hook to build modules of ``kind``: ``build(entry, old_module) -> module``."""
    _BUILDERS[kind] = build


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> int:
    """Replace the modules named in ``layout`` (parents before children); return how many.

    Names that do not resolve inside ``model`` are skipped: ``post_init`` also runs on inner
    base models (e.g. ``LlamaModel`` inside ``LlamaForCausalLM``), where the names carry an
    extra prefix.
    """
    done = 0
    for name in sorted(layout, key=lambda n: (n.count("."), n)):
        entry = layout[name]
        kind = entry.get("kind")
        if kind not in _BUILDERS:
            raise ValueError(
                f"layer {name!r} has acip layout kind {kind!r}, which this acip does not know "
                f"(known: {sorted(_BUILDERS)}). Import the package that registers it "
                f"(e.g. `import acip.quant`) or upgrade acip."
            )
        try:
            old = model.get_submodule(name)
        except AttributeError:
            continue
        new = _BUILDERS[kind](entry, old)
        if new is not old:
            replace_module(model, name, new)
        done += 1
    return done


_HOOK_INSTALLED = False


def install_layout_hook() -> None:
    """Wrap ``PreTrainedModel.post_init`` and ``save_pretrained`` for models with an ``acip_layout``."""
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    from transformers import PreTrainedModel

    from .io import atomic_dir, write_manifest

    original_post_init = PreTrainedModel.post_init
    original_save = PreTrainedModel.save_pretrained

    def post_init(self, *args: Any, **kwargs: Any) -> Any:
        layout = getattr(getattr(self, "config", None), LAYOUT_KEY, None)
        if layout:
            apply_layout(self, layout)
        return original_post_init(self, *args, **kwargs)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(getattr(self, "config", None), LAYOUT_KEY, None) or kwargs.get("push_to_hub"):
            return original_save(self, save_directory, *args, **kwargs)
        with atomic_dir(save_directory) as tmp:  # old export intact until the new one is complete
            out = original_save(self, tmp, *args, **kwargs)
            write_manifest(tmp)
        return out

    post_init.__wrapped__ = original_post_init  # type: ignore[attr-defined]
    save_pretrained.__wrapped__ = original_save  # type: ignore[attr-defined]
    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]
    PreTrainedModel.save_pretrained = save_pretrained  # type: ignore[method-assign]
    _HOOK_INSTALLED = True
