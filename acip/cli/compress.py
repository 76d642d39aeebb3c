"""``python -m acip.compress`` / ``acip-compress``: one ACIP training run, configured by Hydra.

Configs live in the repository's ``conf/`` (found relative to this file, so an editable install
works from any directory; ``ACIP_CONF_DIR`` overrides). The run directory is Hydra's output
directory (``outputs/<date>/<time>``), or the given one for ``resume=<run_dir>``, where the
saved ``config.yaml`` of that run is used again.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

__all__ = ["main", "conf_dir"]


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


def _run_dir(resume: str | None, default: str) -> str:
    """``hydra.run.dir``: the resumed run's directory, else the dated default."""
    if resume:
        p = Path(str(resume)).expanduser()
        if not (p / "config.yaml").is_file():
            raise FileNotFoundError(
                f"resume={resume!r}: no config.yaml there; pass the directory of an earlier run, "
                f"e.g. resume=outputs/2026-11-30/12-00-00"
            )
        return str(p.resolve())
    return default


if not OmegaConf.has_resolver("acip_run_dir"):
    OmegaConf.register_new_resolver("acip_run_dir", _run_dir)


def resumed_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The saved ``config.yaml`` of ``run_dir``, with the command line's ``key=value`` overrides
    of existing leaf keys applied (``resume=... debug.step_delay_s=0``); group choices
    (``model=hf``) cannot change on resume and are ignored."""
    import yaml

    saved = OmegaConf.load(run_dir / "config.yaml")
    for o in overrides:
        key, _, val = o.partition("=")
        if key == "resume" or "/" in key or key.startswith(("+", "~", "hydra.")):
            continue
        cur = OmegaConf.select(saved, key, default=None)
        if cur is not None and not OmegaConf.is_config(cur):
            OmegaConf.update(saved, key, yaml.safe_load(val), merge=False)
    saved.resume = str(run_dir)
    return saved


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from acip.train.run import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if cfg.get("resume"):
        cfg = resumed_config(Path(str(cfg.resume)).expanduser(), list(hc.overrides.task))
    train(cfg, run_dir)
    print(f"[acip] run directory: {run_dir}", flush=True)


def main() -> None:
    """Console entry point (``acip-compress``)."""
    hydra.main(version_base="1.3", config_path=conf_dir(), config_name="compress")(_task)()


if __name__ == "__main__":
    sys.exit(main())
