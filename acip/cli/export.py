"""``python -m acip.export run_dir=... ratio=0.6 [quantize=entropy quantize.lam=14.5] [adapters=false] [out=...]``

Loads ``<run_dir>/score_map.safetensors`` (the model source and the adapters location travel in
its metadata), exports at ``ratio`` and saves with ``save_pretrained`` to ``out`` (default
``<run_dir>/export_r<100*ratio>``, plus ``-<quantize>``, plus ``-no-adapters`` with ``adapters=false``, which
leaves the run's LoRA adapters out). Reload with ``acip.load(out)``.
Arguments are ``key=value`` (Hydra-style overrides, without Hydra's output directories).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "parse_args"]

USAGE = "usage: python -m acip.export run_dir=<run dir or score_map.safetensors> ratio=0.6 [quantize=entropy quantize.lam=14.5] [adapters=false] [out=<dir>]"
KEYS = {"run_dir", "ratio", "out", "quantize", "adapters"}


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; ``quantize.<field>=v`` collect into ``quantize_args``."""
    args: dict[str, Any] = {"quantize_args": {}}
    for a in argv:
        key, sep, val = a.partition("=")
        if not sep:
            raise SystemExit(f"acip.export: argument {a!r} is not key=value\n{USAGE}")
        if key.startswith("quantize."):
            args["quantize_args"][key.split(".", 1)[1]] = _value(val)
        elif key in KEYS:
            args[key] = val if key in ("run_dir", "out") else _value(val)
        else:
            raise SystemExit(f"acip.export: unknown argument {key!r} (known: {sorted(KEYS)}, quantize.<field>)\n{USAGE}")
    for need in ("run_dir", "ratio"):
        if need not in args:
            raise SystemExit(f"acip.export: {need}= is required\n{USAGE}")
    return args


def _quantize_spec(name: Any, params: dict[str, Any]) -> Any:
    if name in (None, "none", False):
        if params:
            raise SystemExit("acip.export: quantize.<field>= given without quantize=<method> (e.g. quantize=entropy)")
        return None
    if name == "entropy" and params:
        from acip.quant.config import EntropyQuantConfig

        return EntropyQuantConfig(**params)
    if params:
        raise SystemExit(f"acip.export: quantize={name} takes no quantize.<field> options")
    return str(name)


def main(argv: Sequence[str] | None = None) -> Path:
    """Export a finished run at one ratio and save it; prints the measured size."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import acip

    sm = acip.ScoreMap.load(args["run_dir"])
    ratio = float(args["ratio"])
    q = _quantize_spec(args.get("quantize"), args["quantize_args"])
    run_dir = sm.path.parent
    adapters = args.get("adapters", True)
    if not isinstance(adapters, bool):
        raise SystemExit(f"acip.export: adapters={adapters!r}; use adapters=true or adapters=false\n{USAGE}")
    suffix = (f"-{args['quantize']}" if q is not None else "") + ("" if adapters else "-no-adapters")
    out = Path(args.get("out") or run_dir / f"export_r{int(round(100 * ratio))}{suffix}")
    model = acip.export(sm, ratio=ratio, quantize=q, adapters=adapters)
    rep = acip.size_report(model)
    model.save_pretrained(out)
    src = sm.source.get("model")
    try:
        _, tok = acip.load_base(src) if src else (None, None)
    except Exception:  # noqa: BLE001 - the tokenizer is a convenience
        tok = None
    if tok is not None:
        tok.save_pretrained(out)
    print(f"[acip] exported {sm.method} score map at ratio {ratio}: measured target-layer ratio "
          f"{rep.target_ratio:.4f}, whole model {rep.full_ratio:.4f} -> {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
