"""Module surgery: which layers a transformation targets, and swapping a module by dotted name.

One meaning of ``target_modules`` / ``exclude_modules`` everywhere in acip (parametrize, the
quantizers, the layout hook), as in peft:

* ``"all-linear"``: every linear-like layer except the output embedding (``lm_head``);
* a **string**: a regular expression that must match the *whole* dotted name;
* a **list** of strings: names equal to an item or ending in ``"." + item``
  (``["q_proj", "v_proj"]``).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

from torch import nn

__all__ = ["NoTargetLayersError", "is_linear_like", "matches", "find_targets", "replace_module", "output_embedding"]


class NoTargetLayersError(ValueError):
    """The model has no layer that the target/exclude patterns select."""


def is_linear_like(m: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (which stores ``W^T``)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def matches(name: str, patterns: str | Iterable[str]) -> bool:
    """Whether ``name`` is selected by ``patterns`` (a full-match regex, or a list of names/suffixes)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (``lm_head``), or None."""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        return get_out()
    except (AttributeError, NotImplementedError):
        return None


def find_targets(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
    accept: Callable[[nn.Module], bool] = is_linear_like,
    what: str = "linear layers",
    hint: str = "Use target_modules='all-linear' or list names that exist.",
) -> list[str]:
    """Dotted names of the modules selected, in module order; never the output embedding.

    ``target_modules=None`` means ``"all-linear"``. ``accept`` says which module types qualify
    (a selected module of another type is an error that names it). Raises
    :class:`NoTargetLayersError` when nothing is selected, with ``hint`` as the advice.
    """
    if target_modules is None:
        target_modules = "all-linear"
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    head = output_embedding(model)
    names = []
    for name, mod in model.named_modules():
        if not name or mod is head:
            continue
        if target_modules == "all-linear":
            if not accept(mod):
                continue
        elif not matches(name, target_modules):
            continue
        if exclude_modules and matches(name, exclude_modules):
            continue
        if not accept(mod):
            raise TypeError(
                f"target module {name!r} is a {type(mod).__name__}, not nn.Linear: it is not one of the {what} "
                f"this step handles. Narrow target_modules or add it to exclude_modules."
            )
        names.append(name)
    if not names:
        present = [n for n, m in model.named_modules() if n and accept(m)][:8]
        raise NoTargetLayersError(
            f"no {what} in {type(model).__name__} match target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r}. {what.capitalize()} present: {present or 'none'}. {hint}"
        )
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``name`` inside ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
