"""conf/sweep/acip.yaml: a valid W&B sweep whose command runs the Hydra entry point."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import yaml

from helpers_train import TINY_ARGS, child_env, run_compress

SWEEP = Path(__file__).resolve().parents[1] / "conf" / "sweep" / "acip.yaml"


def build_command(sweep: dict, params: dict[str, object]) -> list[str]:
    """What a W&B agent runs for one parameter set (its macro expansion)."""
    macros = {"${env}": [shutil.which("env") or "/usr/bin/env"], "${interpreter}": [sys.executable],
              "${program}": [sweep["program"]], "${args_no_hyphens}": [f"{k}={v}" for k, v in params.items()]}
    cmd: list[str] = []
    for part in sweep["command"]:
        cmd += macros.get(part, [part])
    return cmd


def test_sweep_file_is_a_bayes_search_over_lr_reg_factor_and_stop_ratio():
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "bayes"
    assert sweep["metric"] == {"name": "final/val_ppl_mean", "goal": "minimize"}  # validation, not a domain
    assert set(sweep["parameters"]) == {"acip.lr", "acip.reg_factor", "acip.stop_ratio"}
    assert "${args_no_hyphens}" in sweep["command"] and "acip.compress" in sweep["command"]


def test_sweep_command_for_one_parameter_set_runs_the_tiny_model(tmp_path):
    sweep = yaml.safe_load(SWEEP.read_text())
    params = {"acip.lr": 0.003, "acip.reg_factor": 1.3, "acip.stop_ratio": 0.5}
    cmd = build_command(sweep, params) + [*TINY_ARGS, "logger=wandb", "eval.ratios=[0.5]", "eval.baseline=false",
                                          f"hydra.run.dir={tmp_path / 'run'}"]
    assert cmd[2:4] == ["-m", "acip.compress"] and "acip.lr=0.003" in cmd
    run_compress(tmp_path / "run", cmd=cmd, env=child_env(WANDB_MODE="offline"))
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["acip"]["lr"] == 0.003 and cfg["acip"]["reg_factor"] == 1.3
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["reached_stop_ratio"] and "0.5" in res["ppl"]["acip"] and math.isfinite(res["val_ppl_mean"])
    data = next((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert sweep["metric"]["name"].encode() in data
