"""``acip.load(dir)``: read back what acip saved, verified, from its own saved description.

* A directory written by :meth:`ACIPModel.save_pretrained` (a run directory is one): the
  parametrized model exactly as trained; with ``ratio=`` the export at that ratio.
* An exported (optionally quantized) model directory: the model, after checking every tensor
  against the directory's manifest and refusing missing or unexpected weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.base import BUILTIN_MODELS, load_base
from .core.io import ArtifactError, verify_manifest
from .core.layout import LAYOUT_KEY
from .core.parametrize import STATE_FILE, ACIPModel

__all__ = ["load", "load_base", "BUILTIN_MODELS"]


def _legacy(p: Path) -> bool:
    return (p / "adapters" / "acip_config.json").is_file() or (
        (p / "acip_config.json").is_file() and (p / "acip_adapters.safetensors").is_file())


def load(path: str | os.PathLike, ratio: float | None = None, *, verify: bool = True,
         dtype: torch.dtype | None = None, model: nn.Module | None = None, **export_kwargs: Any) -> nn.Module:
    """Load a saved parametrized model (or its export at ``ratio``) or an exported model.

    ``verify=False`` skips the sha256 checks. ``model=`` supplies the base model of a
    parametrized directory (otherwise the one named in its config is loaded). ``export_kwargs``
    (``adapters=``, ``quantize=``) go to :func:`acip.export` when ``ratio`` is given.
    """
    import acip  # noqa: F401  (installs the layout hook and registers module kinds)

    p = Path(path).expanduser()
    if (p / STATE_FILE).is_file():
        pm = ACIPModel.from_pretrained(p, model=model, verify=verify, dtype=dtype)
        if ratio is None:
            if export_kwargs:
                raise TypeError(f"{sorted(export_kwargs)} only apply with ratio=: acip.load(dir, ratio=0.6, ...)")
            return pm
        from .export import export

        return export(pm, ratio, **export_kwargs)
    if _legacy(p):
        raise ArtifactError(f"{str(p)!r} was written by an earlier acip (adapters without their basis). Convert "
                            f"it once with `python -m acip.convert {p}` (rebuilds it from its base model and "
                            f"saves the current format), then load it.")
    if ratio is not None or export_kwargs or model is not None:
        raise TypeError(f"{str(p)!r} is not a parametrized model directory: ratio=/model=/export options do not apply")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(p)!r} holds no config.json and no {STATE_FILE}: pass a run directory, a directory written by "
            f"ACIPModel.save_pretrained, or an exported model saved with save_pretrained"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(p))
    if not getattr(config, LAYOUT_KEY, None):
        raise ValueError(
            f"{str(p)!r} is a plain transformers checkpoint, not an acip export; load it with "
            f"acip.load_base({str(p)!r}) or transformers directly"
        )
    if verify:
        verify_manifest(p, required=True)
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ArtifactError(f"{str(p)!r} holds no weight files (model.safetensors): the export is incomplete; "
                            f"export it again")
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    kw: dict[str, Any] = {"dtype": dtype or getattr(config, "dtype", None) or torch.float32}
    try:
        out, info = (cls or AutoModelForCausalLM).from_pretrained(str(p), output_loading_info=True, **kw)
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, torch's RuntimeError, ...
        raise ArtifactError(f"{str(p)!r} does not match its acip_layout: its weights do not load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}). Export it again.") from None
    tied = set(getattr(out, "all_tied_weights_keys", {}) or {})
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ArtifactError(
            f"{str(p)!r} does not match its acip_layout: missing weights {missing[:4]}, unexpected {unexpected[:4]}, "
            f"wrong shapes {[m[0] if isinstance(m, tuple) else m for m in mismatched][:4]}. The export's config or "
            f"weights were edited or cut short: export it again."
        )
    return out.eval()
