"""``python -m acip.compress`` / ``acip-compress``: one ACIP training run, configured by Hydra.

Configs live in the repository's ``conf/`` (found relative to this file, so an editable install
works from any directory; ``ACIP_CONF_DIR`` overrides). The run directory is Hydra's output
directory: by default a fresh ``outputs/<date>/<time>`` (``-2``, ``-3``, ... appended when two
runs start in the same second), created exclusively by the ``acip_run_dir`` resolver.
``resume=<run_dir>`` continues that run in its own directory with its saved ``config.yaml``;
command-line overrides of keys in that config apply, anything else is refused by name.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Collection

import hydra
from omegaconf import DictConfig, OmegaConf

__all__ = ["main", "conf_dir", "unique_run_dir", "resumed_config", "check_resume_arg"]

_MISSING = object()
_RUN_DIR: list[str] = []  # the directory this process created, reused by every later resolution


def conf_dir() -> str:
    """Absolute path of the ``conf/`` directory."""
    env = os.environ.get("ACIP_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "compress.yaml").is_file():
        raise FileNotFoundError(
            f"acip's Hydra configs are not at {path} (no compress.yaml). Install acip in editable mode "
            f"from its repository (pip install -e .), or set ACIP_CONF_DIR=/path/to/acip/conf."
        )
    return str(path)


def _resume_problem(resume: str) -> str | None:
    """Why ``resume=<resume>`` cannot be continued, or None."""
    p = Path(str(resume)).expanduser()
    if not p.is_dir():
        return (f"resume={resume}: no such directory. Pass the directory of an earlier run, "
                f"e.g. resume=outputs/2026-11-30/12-00-00")
    if not (p / "config.yaml").is_file():
        return (f"resume={resume}: {str(p)!r} holds no config.yaml, so it is not a run directory (or the run "
                f"failed before it started). Pass the directory of an earlier run.")
    return None


def unique_run_dir(base: str | os.PathLike) -> Path:
    """Create ``base`` exclusively (``os.mkdir``), else ``base-2``, ``base-3``, ...; return it.

    Two processes never get the same directory, even when they start in the same second.
    """
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        cand = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            os.mkdir(cand)
            return cand
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a fresh run directory next to {str(base)!r}; pass hydra.run.dir=<dir>")


def _run_dir(resume: str | None, default: str) -> str:
    """``hydra.run.dir``: the resumed run's directory, else a fresh one (created once per process).

    DDP ranks > 0 re-run this script with ``hydra.run.dir=<rank 0's directory>`` (Lightning's
    launcher), so they never reach this resolver and share rank 0's directory.
    """
    if resume:
        problem = _resume_problem(resume)
        if problem:
            raise FileNotFoundError(problem)
        return str(Path(str(resume)).expanduser().resolve())
    if not _RUN_DIR:
        _RUN_DIR.append(str(unique_run_dir(default)))
    return _RUN_DIR[0]


if not OmegaConf.has_resolver("acip_run_dir"):
    OmegaConf.register_new_resolver("acip_run_dir", _run_dir)


def _config_groups() -> set[str]:
    """Names of the config groups in ``conf/`` (``model``, ``acip``, ...)."""
    return {p.name for p in Path(conf_dir()).iterdir() if p.is_dir()}


def resumed_config(run_dir: Path, overrides: list[str], groups: Collection[str] = ()) -> DictConfig:
    """The saved ``config.yaml`` of ``run_dir`` with the command line's overrides applied.

    ``key=value`` for any key of the saved config (null ones included) replaces its value
    (``resume=... debug.step_delay_s=0``). Group choices (``acip=paper``), additions and deletions
    (``+k=v``, ``~k``) and keys the saved config lacks are refused, each named, in one error.
    ``hydra.*`` overrides and ``resume`` itself are Hydra's and pass through.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = OmegaConf.load(Path(run_dir) / "config.yaml")
    groups = set(groups) | _config_groups()
    refused: list[str] = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key == "resume" or key == "hydra" or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if key in groups or "/" in key or o.package is not None:
            refused.append(f"{o.input_line}: a config group choice (a run's groups are fixed when it starts)")
        elif o.is_delete() or o.is_sweep_override():
            refused.append(f"{o.input_line}: deletions and sweeps do not apply to a resumed run")
        elif OmegaConf.select(saved, key, default=_MISSING) is _MISSING:
            refused.append(f"{o.input_line}: no key {key!r} in the saved config.yaml")
        else:
            OmegaConf.update(saved, key, o.value(), merge=False)
    if refused:
        raise ValueError(
            f"resume={run_dir} continues that run with its saved config.yaml; these overrides cannot apply:\n  "
            + "\n  ".join(refused)
            + "\nDrop them to resume (keys of the saved config, e.g. acip.max_steps=500, do apply), or start a new run."
        )
    saved.resume = str(run_dir)
    return saved


def check_resume_arg(argv: list[str]) -> str | None:
    """The problem with a ``resume=<dir>`` argument (checked before Hydra starts), or None."""
    value = None
    for arg in argv:
        key, eq, val = arg.partition("=")
        if eq and key.lstrip("+") == "resume":
            value = val.strip().strip("'\"")
    if value in (None, "", "null", "None"):
        return None
    return _resume_problem(value)


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from acip.train.run import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    if cfg.get("resume"):
        resume = Path(str(cfg.resume)).expanduser().resolve()
        if resume != run_dir:
            raise ValueError(f"resume={cfg.resume} continues the run in its own directory, but hydra.run.dir is "
                             f"{str(run_dir)!r}: leave hydra.run.dir out (or set it to the same directory)")
        cfg = resumed_config(resume, list(hc.overrides.task), groups=set(hc.runtime.choices))
    train(cfg, run_dir)
    print(f"[acip] run directory: {run_dir}", flush=True)


def main() -> None:
    """Console entry point (``acip-compress``)."""
    problem = check_resume_arg(sys.argv[1:])
    if problem:
        print(f"acip-compress: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=conf_dir(), config_name="compress")(_task)()


if __name__ == "__main__":
    sys.exit(main())
