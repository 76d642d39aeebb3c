"""trainer=ddp: two CPU processes (gloo) run the tiny model end to end."""
from __future__ import annotations

import csv
import json

from helpers_train import child_env, run_compress


def test_ddp_two_processes_share_one_score_map_and_only_rank0_writes(tmp_path):
    run = tmp_path / "run"
    proc = run_compress(run, "trainer=ddp", "trainer.devices=2", "logger=wandb", "eval.ratios=[0.5]",
                        "eval.baseline=false", env=child_env(WANDB_MODE="offline"), timeout=900)
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2 and res["reached_stop_ratio"]
    digests = res["score_map_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # identical on both ranks
    # rank 0 alone wrote: one W&B run, one row per logged step, no per-process files
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert steps == sorted(set(steps))
    names = {p.name for p in run.iterdir()}
    assert names <= {".hydra", "config.yaml", "wandb", "wandb_run_id.txt", "checkpoints", "acip_config.json",
                     "acip_state.safetensors", "score_map.safetensors", "metrics.csv", "results.json", "plots"}, names
    assert not [p for p in run.rglob("*") if "ddp_process_1" in p.name or p.name == "lightning_logs"]
    assert "train_ddp_process_1" not in (run / ".hydra" / "hydra.yaml").read_text()
