"""``python -m acip.convert <dir>``: bring a run directory of the previous format up to date.

The previous format kept the masks and LoRA factors in ``adapters/`` (``acip_adapters.safetensors``
+ ``acip_config.json``: untyped settings and source), the score map without checksums, and the
activation-aware basis in a side file named in the score map's metadata. This rebuilds the
parametrized model from those files on its base model (re-computing the SVD in the recorded
basis) and writes the current artifact (:meth:`acip.ACIPModel.save_pretrained`) into the same
directory. The old files are left where they are.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from .core.base import load_base
from .core.config import ACIPConfig
from .core.parametrize import ACIPModel, parametrize
from .core.score_map import ScoreMap

__all__ = ["convert_run_dir", "main"]


def convert_run_dir(run_dir: str | Path) -> ACIPModel:
    """Rebuild a previous-format run directory and save it in the current format; returns the model."""
    import warnings

    d = Path(run_dir)
    adir = d / "adapters"
    if not (adir / "acip_config.json").is_file() or not (d / "score_map.safetensors").is_file():
        raise FileNotFoundError(f"{str(d)!r} is not a previous-format run directory (needs adapters/acip_config.json "
                                f"and score_map.safetensors)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-format warning: converting is the fix
        sm = ScoreMap.load(d / "score_map.safetensors")
    old = json.loads((adir / "acip_config.json").read_text())
    if not (old.get("source") or {}).get("model"):
        raise ValueError(f"{str(adir / 'acip_config.json')!r} does not name its base model; cannot rebuild it")
    cfg: ACIPConfig = sm.config
    legacy_meta = sm.meta
    whitening = None
    if cfg.basis == "activation_aware":
        wfile = d / str(legacy_meta.get("whitening"))
        whitening = load_file(str(wfile))
    base, _ = load_base(cfg.source.model)
    pm = parametrize(base, cfg, whitening=whitening)
    state = load_file(str(adir / "acip_adapters.safetensors"))
    pm.load_adapter_state(state, str(adir / "acip_adapters.safetensors"))
    pm.score_map = ScoreMap._from_layers(pm, sm.scores, sm.method, stop_ratio=sm.stop_ratio,
                                         meta={k: v for k, v in sm.meta.items() if k not in ("parametrize", "whitening",
                                                                                             "adapters")})
    pm.save_pretrained(d)
    return pm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m acip.convert", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory written by an earlier acip")
    args = ap.parse_args(argv)
    try:
        convert_run_dir(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[acip] converted {args.run_dir}: acip.load('{args.run_dir}') now loads it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
