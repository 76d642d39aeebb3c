"""``quantize_(model, config)``: the one verb, torchao style, and the one layer walker.

A quantizer is a config dataclass plus a handler registered for that config type::

    @register_quantizer(MyConfig, "mine")        # "mine" becomes an alias of MyConfig()
    def _quantize_linear(linear: nn.Linear, config: MyConfig, name: str) -> nn.Module | None:
        ...                                      # the replacement module, or None = keep dense

``quantize_`` resolves the config (an instance of a registered type, an alias string such as
``"entropy"`` / ``"nf4"``, or a dict of fields), finds the target layers with
:func:`target_linears` (``config.target_modules`` / ``config.exclude_modules``, the one meaning
of ``acip.core.surgery``), checks them all before changing anything, calls the handler once per
layer and swaps the result in with ``acip.core.surgery.replace_module``. A replacement that
carries an ``entry`` (a dict with a layout ``kind``) is recorded in ``model.config.acip_layout``,
so ``save_pretrained`` / ``acip.load`` rebuild it.

A target whose weight has no elements (a factor of a rank-0 ``LowRankLinear``: ``0 x in`` or
``out x 0``) is valid and holds nothing to quantize: it is skipped, said in ``progress``, and
listed by ``acip.quant.report`` under ``empty``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

from ..core.layout import LAYOUT_KEY
from ..core.lowrank import LowRankLinear
from ..core.surgery import find_targets, matches, output_embedding, replace_module
from .config import TARGET_HELP, config_from_dict

__all__ = ["register_quantizer", "quantize_", "resolve_config", "target_linears", "registered_configs"]

Handler = Callable[[nn.Linear, Any, str], "nn.Module | None"]
H = TypeVar("H", bound=Handler)

DEFAULT_ALIAS = "entropy"
_HANDLERS: dict[type, Handler] = {}
_ALIASES: dict[str, type] = {}


def register_quantizer(config_type: type, *aliases: str) -> Callable[[H], H]:
    """Register ``handler(linear, config, name) -> module | None`` for ``config_type``.

    Each alias (case-insensitive) names ``config_type()`` with its defaults, so
    ``quantize_(model, alias)`` works; registering a type again replaces its handler.
    """
    if not isinstance(config_type, type):
        raise TypeError(f"register_quantizer expects a config class, got {config_type!r}; "
                        f"use @register_quantizer(MyConfig) on a function (linear, config, name) -> module")

    def deco(handler: H) -> H:
        if not callable(handler):
            raise TypeError(f"register_quantizer({config_type.__name__}) decorates a function, got {handler!r}")
        _HANDLERS[config_type] = handler
        for a in aliases:
            _ALIASES[a.lower()] = config_type
        return handler

    return deco


def registered_configs() -> dict[str, list[str]]:
    """``{config type name: [its aliases]}`` of every registered quantizer."""
    return {t.__name__: sorted(a for a, c in _ALIASES.items() if c is t) for t in _HANDLERS}


def _known() -> str:
    return ", ".join(f"{t}" + (f" (or {', '.join(repr(a) for a in al)})" if al else "")
                     for t, al in registered_configs().items())


def _handler_for(config: Any) -> Handler | None:
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    return None


def resolve_config(spec: Any) -> Any:
    """The config object ``spec`` stands for.

    ``None`` -> ``EntropyQuantConfig()``; an instance of a registered type -> itself; a string ->
    its alias' default config; a mapping -> ``cls(**fields)``, where ``cls`` is the alias in
    ``spec["name"]`` (default ``"entropy"``). Anything else is a ``TypeError`` naming the
    registered types.
    """
    if spec is None:
        spec = DEFAULT_ALIAS
    if _handler_for(spec) is not None:
        return spec
    if isinstance(spec, str):
        cls = _ALIASES.get(spec.lower())
        if cls is None:
            raise ValueError(f"unknown quantizer {spec!r}; registered: {_known()}. Pass one of those names or "
                             f"a config object")
        return cls()
    if isinstance(spec, Mapping):
        name = spec.get("name", DEFAULT_ALIAS)
        cls = _ALIASES.get(str(name).lower())
        if cls is None:
            raise ValueError(f"unknown quantizer name={name!r} in {dict(spec)!r}; registered: {_known()}")
        return config_from_dict(cls, spec)
    raise TypeError(f"quantize_ has no quantizer for a config of type {type(spec).__name__} ({spec!r}); "
                    f"registered: {_known()}. Pass one of those, or register a handler with "
                    f"@acip.quant.register_quantizer({type(spec).__name__})")


def target_linears(model: nn.Module, target_modules: Any = "all-linear",
                   exclude_modules: Any = None) -> dict[str, nn.Linear]:
    """``{dotted name: nn.Linear}`` selected by the patterns, in module order; never the output embedding.

    Patterns have the meaning of ``acip.core.surgery.matches`` ("all-linear"/None, a full-match
    regex string, or a list of names/suffixes). A selected ``LowRankLinear`` stands for its two
    factors ``.down`` and ``.up`` (each still subject to ``exclude_modules``). Raises
    ``NoTargetLayersError`` when nothing is selected.
    """
    pattern = target_modules if isinstance(target_modules, str) or target_modules is None else list(target_modules)
    hint = (f"quantize_ replaces nn.Linear layers (never the output embedding, never a layer that is already "
            f"quantized, not GPT-2's Conv1D). Pass a model that has some, or set target_modules to names that "
            f"exist: {TARGET_HELP}.")
    names = find_targets(model, pattern, exclude_modules,
                         accept=lambda m: isinstance(m, (nn.Linear, LowRankLinear)),
                         what="linear layers", hint=hint)
    head = output_embedding(model)
    out: dict[str, nn.Linear] = {}
    for name in names:
        mod = model.get_submodule(name)
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, LowRankLinear) and exclude_modules and matches(parent_name, exclude_modules):
            continue  # a factor of an excluded low-rank layer
        factors = [(name, mod)] if isinstance(mod, nn.Linear) else [(f"{name}.{n}", c) for n, c in mod.named_children()]
        for full, lin in factors:
            if isinstance(lin, nn.Linear) and lin is not head and not (exclude_modules and matches(full, exclude_modules)):
                out[full] = lin
    return out


def _check_weights(targets: Mapping[str, nn.Linear]) -> None:
    """Every target must hold a float weight: int8 (or other integer) weights are already codes."""
    for name, lin in targets.items():
        w = getattr(lin, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
            raise TypeError(f"{name}: weight dtype {got} is not a float type; quantize_ quantizes float weights "
                            f"(float32, bfloat16, float16). Load the model in a float dtype (e.g. dtype=torch.float32) "
                            f"or leave the layer out with exclude_modules=[{name!r}]")


def _per_layer_configs(model: nn.Module, cfg: Any, targets: Mapping[str, nn.Linear], calib: Any) -> dict[str, Any]:
    """``{name: config}`` where the config varies by layer (``allocation="sensitivity"``: its lam;
    ``rounding="gptq"``: its inputs' Gram); empty for a data-free config."""
    sens = getattr(cfg, "allocation", "uniform") == "sensitivity"
    gptq = getattr(cfg, "rounding", "nearest") == "gptq"
    if not (sens or gptq):
        if calib is not None:
            raise ValueError(f"calib= is used only by allocation='sensitivity' or rounding='gptq'; {type(cfg).__name__} "
                             f"here is data-free (pass EntropyQuantConfig(lam=..., allocation='sensitivity') or "
                             f"EntropyQuantConfig(fmt='uniform', rounding='gptq') to use the batches)")
        return {}
    if gptq and getattr(cfg, "gram", None) is not None:  # a Gram given by the caller: every target uses it
        if sens or calib is not None:
            raise ValueError("EntropyQuantConfig(gram=...) is one layer's Gram given directly; pass it without calib= "
                             "and without allocation='sensitivity' (or leave gram= out and pass calib=)")
        return {}
    if calib is None:
        what = "allocation='sensitivity'" if sens else "rounding='gptq'"
        raise ValueError(f"{what} needs calibration batches: quantize_(model, cfg, calib=batches), "
                         "e.g. batches = acip.eval.token_windows(tok, acip.data.kjv_split()[0], 128, 8)")
    from dataclasses import replace

    out = {n: cfg for n in targets}
    if sens:
        from .sensitivity import plan_layer_lams

        out = {n: replace(cfg, lam=lam) for n, lam in plan_layer_lams(model, dict(targets), cfg, calib).items()}
    if gptq:
        grams = calibration_grams(model, calib, [n for n, lin in targets.items() if lin.weight.numel()])
        out = {n: replace(out.get(n, cfg), gram=g) for n, g in grams.items()}
    return out


def calibration_grams(model: nn.Module, calib: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: X^T X}`` (fp32) of the inputs of the linears ``names`` over the calibration batches
    (``rounding="gptq"``): one forward per batch (:func:`acip.core.whiten.input_grams`); layers that
    read the same input share one tensor."""
    from acip.core.whiten import input_grams

    from .sensitivity import calibration_batches

    grams = input_grams(model, (b["input_ids"] for b in calibration_batches(calib)), names, desc="gptq calibration")
    small = {id(g): g.float() for g in grams.values()}
    return {n: small[id(g)] for n, g in grams.items()}


def _summary(new: nn.Module) -> str:
    describe = getattr(new, "describe", None)
    return describe() if callable(describe) else type(new).__name__


@torch.no_grad()
def quantize_(model: nn.Module, config: Any = None, progress: Callable[[str], None] | None = None,
              calib: Any = None) -> nn.Module:
    """Quantize the target linears of ``model`` in place with the quantizer of ``config``; return it.

    ``config``: a config object of a registered type (``EntropyQuantConfig``, ``NF4Config``, ...),
    an alias (``"entropy"``, ``"entquant"``, ``"nf4"``), a dict of fields (``{"lam": 14.5}``;
    ``"name"`` picks the alias, default ``"entropy"``) or None (``EntropyQuantConfig()``).
    ``progress`` (e.g. ``print``) receives one line per target layer. ``calib``: calibration batches
    (token ids) for a config with ``allocation="sensitivity"``, which then sets each layer's ``lam``
    (``acip.quant.sensitivity.plan_layer_lams``, from the empirical Fisher), or with
    ``rounding="gptq"``, which then gives each layer its inputs' ``X^T X`` (one forward per batch,
    before any layer changes; one fp32 Gram per distinct layer input is held until the end: in^2 x 4
    bytes each); every other config is data-free and refuses it.

    Raises ``NoTargetLayersError`` when no layer is selected and ``TypeError`` for a target whose
    weight is not a float tensor, both before any layer changes.
    """
    cfg = resolve_config(config)
    handler = _handler_for(cfg)
    targets = target_linears(model, getattr(cfg, "target_modules", None), getattr(cfg, "exclude_modules", None))
    _check_weights(targets)
    layer_cfg = _per_layer_configs(model, cfg, targets, calib)
    hf_config = getattr(model, "config", None)
    layout = dict(getattr(hf_config, LAYOUT_KEY, None) or {}) if hf_config is not None else None
    say = progress or (lambda _line: None)
    try:
        for name, lin in targets.items():
            if lin.weight.numel() == 0:
                say(f"{name}: skipped, weight {tuple(lin.weight.shape)} is empty (a factor of a rank-0 layer): "
                    f"nothing to quantize")
                continue
            t0 = time.perf_counter()
            new = handler(lin, layer_cfg.get(name, cfg), name)
            if new is None:
                say(f"{name}: kept dense")
                continue
            replace_module(model, name, new)
            entry = getattr(new, "entry", None)
            if layout is not None and isinstance(entry, dict) and "kind" in entry:
                layout[name] = entry
            say(f"{name}: {_summary(new)}, {time.perf_counter() - t0:.1f}s")
    finally:  # a handler that raises midway leaves the layers it replaced described, so the model still saves
        if layout is not None:
            setattr(hf_config, LAYOUT_KEY, layout)
            if callable(getattr(cfg, "to_dict", None)):
                hf_config.acip_quant = cfg.to_dict()
                if getattr(cfg, "allocation", "uniform") == "sensitivity":
                    hf_config.acip_quant["layer_lam"] = {n: c.lam for n, c in layer_cfg.items()}
    return model
