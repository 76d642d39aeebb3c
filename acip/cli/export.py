"""``acip-export`` / ``python -m acip.export``: export a finished run at one ratio and save it.

    acip-export <run_dir> --ratio 0.6 [--quantize entropy --quantize-arg lam=14.5] [--adapters auto|true|false] [--out DIR]
    acip-export <run_dir> --size-mb 40            (or --bits-per-param 3.0) [--calib-windows 8 [--calib-data run|kjv]]
        [--quantize entropy --quantize-arg fmt=uniform [--quantize-arg rounding=gptq]]   (ECSQ storage; gptq needs --calib-windows)

The Hydra-style spelling of earlier versions (``run_dir=... ratio=0.6 quantize=entropy
quantize.lam=14.5 adapters=false out=...``) is accepted too. The run directory holds the model's
own description (:meth:`acip.ACIPModel.save_pretrained`); its base model is loaded once, and
its tokenizer is saved next to the export. Default ``--out``: ``<run_dir>/export_r<100*ratio>``
(plus ``-<quantize>``, plus ``-no-adapters``); with a byte budget ``export_mb<size>`` or
``export_b<bits>``. A byte budget picks every layer's rank and quantizer rate (acip/export/budget.py);
its cost model is cached in the run directory, so another budget takes seconds. Reload with
``acip.load(out)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]

def _ratio(text: str) -> float:
    from acip.core.size import check_ratio

    try:
        return check_ratio(float(text), "ratio")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}: {e}") from None


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _kv(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. lam=14.5), got {text!r}")
    try:
        return key, yaml.safe_load(val)
    except yaml.YAMLError:
        return key, val


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="acip-export", description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: acip-export outputs/2026-12-01/10-00-00 --ratio 0.6 "
                                        "--quantize entropy --quantize-arg lam=14.5")
    ap.add_argument("run_dir", help="a run directory (or its score_map.safetensors)")
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--ratio", type=_ratio, help="fraction of target-layer parameters to keep, in (0, 1]")
    size.add_argument("--size-mb", type=_positive, metavar="MB",
                      help="byte budget of the target layers in MB (10^6 bytes): ranks and quantizer rates are "
                           "chosen per layer to fit it (never above, within 3%%)")
    size.add_argument("--bits-per-param", type=_positive, metavar="BITS",
                      help="byte budget as bits per target-layer parameter (e.g. 3.0)")
    ap.add_argument("--calib-windows", type=int, default=0, metavar="N",
                    help="with a byte budget: measure per-layer sensitivities (and gptq's Grams) on N windows of 128 "
                         "tokens of training text (default 0: data-free cost model)")
    ap.add_argument("--calib-data", choices=["run", "kjv"], default="run",
                    help="the training text of --calib-windows: run (the run's own data group, without the "
                         "validation split it set aside; the default) or kjv (the KJV training split)")
    ap.add_argument("--quantize", choices=["entropy", "nf4", "lossless"], default=None,
                    help="hand the factors to a quantizer (options with --quantize-arg)")
    ap.add_argument("--quantize-arg", type=_kv, action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the quantizer's config, e.g. lam=14.5 (repeatable)")
    ap.add_argument("--adapters", choices=["auto", "true", "false"], default="auto",
                    help="fold the run's LoRA adapters in: auto (where the run measured them to help on its "
                         "validation split; the default), true or false")
    ap.add_argument("--no-adapters", action="store_const", const="false", dest="adapters",
                    help="the same as --adapters false")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: inside the run directory)")
    return ap


VALUE_OPTIONS = ("--quantize-arg",)
"""Options whose value is itself ``FIELD=VALUE``: :func:`modernise_argv` leaves that value as it is."""


def modernise_argv(argv: Sequence[str], special: Callable[[str, str], list[str] | None] | None = None) -> list[str]:
    """Translate the earlier Hydra-style ``key=value`` spelling into argparse tokens.

    ``run_dir=X`` -> the positional ``X``; ``key_name=v`` -> ``--key-name=v`` (argparse names an
    unknown key as unrecognised); flags, bare words and paths (a ``/`` before the ``=``) pass
    unchanged, and so does the value after an option that takes ``FIELD=VALUE`` (``--quantize-arg
    lam=14.5``). ``special(key, value)`` may return the tokens for a key itself (``None``: the rule
    above). ``acip-export`` and ``acip-finetune`` share it.
    """
    out: list[str] = []
    for i, a in enumerate(argv):
        key, sep, val = a.partition("=")
        if not sep or a.startswith("-") or "/" in key or (i and argv[i - 1] in VALUE_OPTIONS):
            out.append(a)
        elif key == "run_dir":
            out.append(val)
        elif special is not None and (tokens := special(key, val)) is not None:
            out += tokens
        else:
            out.append(f"--{key.replace('_', '-')}={val}")
    return out


def _export_key(key: str, val: str) -> list[str] | None:
    if key.startswith("quantize."):
        return ["--quantize-arg", f"{key.split('.', 1)[1]}={val}"]
    if key == "adapters":
        return [f"--adapters={ {'no': 'false', '0': 'false', 'yes': 'true', '1': 'true'}.get(val.lower(), val.lower())}"]
    return None


def _modernise(argv: Sequence[str]) -> list[str]:
    """``acip-export``'s old spelling: :func:`modernise_argv` plus ``quantize.<arg>=`` and ``adapters=``."""
    return modernise_argv(argv, _export_key)


def main(argv: Sequence[str] | None = None) -> Path:
    """Export at one ratio and save; prints the measured size."""
    ap = build_parser()
    args = ap.parse_args(_modernise(sys.argv[1:] if argv is None else argv))
    if args.quantize_arg and args.quantize is None:
        ap.error("--quantize-arg given without --quantize (e.g. --quantize entropy)")
    budget = args.size_mb is not None or args.bits_per_param is not None
    if budget and args.quantize not in (None, "entropy"):
        ap.error(f"a byte budget (--size-mb / --bits-per-param) stores its quantized layers with the entropy quantizer; "
                 f"--quantize {args.quantize} does not combine with it (drop it, or pass --quantize entropy "
                 f"--quantize-arg fmt=uniform [--quantize-arg rounding=gptq --calib-windows N])")
    if args.calib_windows and not budget:
        ap.error("--calib-windows goes with a byte budget (--size-mb or --bits-per-param)")
    import acip
    from acip.core.base import load_base
    from acip.core.config import ACIPConfig
    from acip.core.parametrize import STATE_FILE, ACIPModel

    run_dir = Path(args.run_dir).expanduser()
    if run_dir.is_file():
        run_dir = run_dir.parent
    if not (run_dir / STATE_FILE).is_file():
        ap.error(f"{str(run_dir)!r} holds no {STATE_FILE}: pass the directory of a finished run "
                 f"(or convert an old one with python -m acip.convert {run_dir})")
    quantize: Any = None
    if args.quantize is not None:
        from acip.quant.registry import resolve_config

        try:  # the registry builds (and validates) the quantizer's config from its alias and fields
            quantize = resolve_config({"name": args.quantize, **dict(args.quantize_arg)})
        except (TypeError, ValueError) as e:
            ap.error(f"--quantize {args.quantize} {' '.join(f'--quantize-arg {k}={v}' for k, v in args.quantize_arg)}: {e}")
    import json

    import torch

    cfg = ACIPConfig.from_dict(json.loads((run_dir / "acip_config.json").read_text())["config"])
    base, tok = (load_base(cfg.source.model, dtype=getattr(torch, cfg.source.dtype)) if cfg.source.model
                 else (None, None))  # the base model once, with its tokenizer
    pm = ACIPModel.from_pretrained(run_dir, model=base)
    adapters: bool | str = {"auto": "auto", "true": True, "false": False}[args.adapters]
    suffix = (f"-{args.quantize}" if quantize is not None else "") + ("-no-adapters" if adapters is False else "")
    if budget:
        return _export_budget(args, ap, run_dir, pm, tok, adapters, quantize)
    out = args.out or run_dir / f"export_r{int(round(100 * args.ratio))}{suffix}"
    model = acip.export(pm, args.ratio, quantize=quantize, adapters=adapters)
    rep = acip.size_report(model)
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    print(f"[acip] exported {pm.score_map.method} score map at ratio {args.ratio}: measured target-layer ratio "
          f"{rep.target_ratio:.4f}, whole model {rep.full_ratio:.4f} -> {out}", flush=True)
    return out


def _calibration_texts(run_dir: Path, which: str, tok: Any) -> tuple[list[str], str]:
    """Training texts for the byte budget's calibration, in a seeded-random order (so a mixture's
    components all appear in the first windows): ``"run"`` = the run's data group (``config.yaml``)
    minus the validation split the run set aside (:func:`acip.train.run.run_validation_split`), or,
    for a run without a saved config, the KJV training split; ``"kjv"`` = the KJV training split."""
    import random

    cfg = None
    if which == "run" and (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg is not None and cfg.get("data") is not None and cfg.get("eval") is not None:
        from acip.train.run import _build, run_validation_split

        train, _ = _build(cfg.data)
        train, _ = run_validation_split(cfg, train, tok)
        what = f"the run's training data ({cfg.data.get('_target_')}, validation split left out)"
    else:
        from acip.data import kjv_split

        train, what = kjv_split()[0], "the KJV training split"
    texts = list(train)
    random.Random(0).shuffle(texts)
    return texts, what


def _export_budget(args: argparse.Namespace, ap: argparse.ArgumentParser, run_dir: Path, pm: Any, tok: Any,
                   adapters: bool | str, quantize: Any = None) -> Path:
    """``--size-mb`` / ``--bits-per-param``: the byte-budget export, its cost model cached in ``run_dir``;
    ``--quantize entropy --quantize-arg fmt=uniform ...`` sets its quantized layers' format (its lam is chosen per layer)."""
    from acip.export.budget import COST_FILE, BudgetError, export_budget

    calib = None
    if args.calib_windows:
        if tok is None:
            ap.error("--calib-windows needs the run's tokenizer (a base model named in its config)")
        from acip.eval import token_windows

        texts, what = _calibration_texts(run_dir, args.calib_data, tok)
        calib = [w[None] for w in token_windows(tok, texts, 128, args.calib_windows)]
        print(f"[acip] calibration: {len(calib)} windows of 128 tokens of {what}", flush=True)
    name = f"mb{args.size_mb:g}" if args.size_mb is not None else f"b{args.bits_per_param:g}"
    out = args.out or run_dir / (f"export_{name}" + ("-no-adapters" if adapters is False else ""))
    try:
        model = export_budget(pm, size_mb=args.size_mb, bits_per_param=args.bits_per_param, adapters=adapters,
                              calib=calib, cache=run_dir / COST_FILE, quant=quantize,
                              progress=lambda line: print(f"[acip] {line}", flush=True))
    except BudgetError as e:
        ap.exit(2, f"acip-export: error: {e}\n")
    except (TypeError, ValueError) as e:
        if quantize is None:
            raise
        ap.error(f"--quantize entropy {' '.join(f'--quantize-arg {k}={v}' for k, v in args.quantize_arg)}: {e}")
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    b = model.config.acip_export["budget"]
    print(f"[acip] exported at a budget of {b['budget_bytes']} bytes: target layers store {b['stored_bytes']} bytes "
          f"({b['bits_per_param']:.3f} bits per target parameter) -> {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
