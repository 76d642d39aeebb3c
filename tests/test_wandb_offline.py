"""W&B: offline by default, files inside the run directory, metric keys and images logged."""
from __future__ import annotations

import json

from acip.train.run import setup_wandb_env
from helpers_train import tiny_run


def test_offline_run_files_hold_the_metric_keys_images_and_table():
    run = tiny_run()
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in ("train/size_ratio", "train/task_loss", "train/l1_loss", "train/l1_weight", "train/step_time_s",
                "train/tokens_per_s", "final/ppl_acip_r50", "final/ppl_acip_no_adapters_r50", "final/ppl_singular_values_r50",
                "plots/ratio_vs_ppl", "final/val_ppl_mean", "final/pydoc/ppl_acip_r50", "final/python_source/ppl_dense",
                "final/heldout/ppl_acip_adapters_r50"):
        assert key.encode() in data, key
    assert b"rank/model.layers.0.self_attn.q_proj" in data
    images = {p.name.split("_")[0] for p in (runs[0] / "files/media/images/plots").glob("*.png")}
    assert {"ratio", "score", "kept"} <= images
    tables = list((runs[0] / "files/media/table/final").glob("results_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["domain", "method", "ratio", "ppl", "x_dense", "measured_ratio", "adapters"]
    res = json.loads((run / "results.json").read_text())
    # every domain (and the validation split, where only ACIP's columns are measured): a dense row, then
    # each method at each ratio
    n = len(res["ratios"])
    assert len(table["data"]) == len(res["domains"]) * (1 + len(res["ppl"]) * n) + 1 + len(res["val_ppl"]) * n
    assert set(res["val_ppl"]) == {"acip", "acip_adapters", "acip_no_adapters"}
    assert {row[0] for row in table["data"]} == {*res["domains"], "val"}
    # W&B's cache/data/config directories were kept inside the run directory
    assert (run / "wandb" / ".cache").is_dir() and (run / "wandb_run_id.txt").read_text().strip() in runs[0].name


def test_wandb_env_is_offline_by_default_and_an_explicit_mode_wins(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    setup_wandb_env(tmp_path)
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert all(os.environ[v].startswith(str(tmp_path)) for v in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"))
    monkeypatch.setenv("WANDB_MODE", "online")
    setup_wandb_env(tmp_path)
    assert os.environ["WANDB_MODE"] == "online"
