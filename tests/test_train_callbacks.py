"""The callbacks of an ACIP run on their own, against a tiny parametrized model and a fake trainer."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

import acip
from acip.eval.sweep import format_table, plot_ratio_curves
from acip.train.callbacks import Monitor, RunArtifacts
from acip.train.callbacks.final_eval import evaluate_score_maps, metric_key
from acip.train.module import ACIPModule
from helpers_train import tiny_base, tiny_pm


def fake_trainer(step: int = 0):
    return SimpleNamespace(global_step=step, should_stop=False, is_global_zero=True, world_size=1, loggers=[],
                           optimizers=[])


def test_run_artifacts_make_the_run_directory_one_loadable_model(tmp_path):
    pm = tiny_pm(lora={"r": 2})
    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3)
    with torch.no_grad():
        next(iter(pm.masks().values()))[:3] = -1.0
    module.after_step(1)
    RunArtifacts(tmp_path).on_train_end(fake_trainer(step=1), module)
    assert {p.name for p in tmp_path.iterdir()} == {"acip_config.json", "acip_state.safetensors", "score_map.safetensors"}
    again = acip.load(tmp_path, model=tiny_base())
    assert again.active_ranks() == pm.active_ranks() and again.score_map.digest() == module.score_map.digest()
    assert again.score_map.meta["global_step"] == 1 and again.score_map.meta["updates"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_artifacts_keep_the_last_good_state_when_masks_turn_nan(tmp_path):
    pm = tiny_pm()
    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3)
    artifacts, trainer = RunArtifacts(tmp_path), fake_trainer()
    artifacts.on_train_end(trainer, module)
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        next(iter(pm.masks().values()))[0] = float("nan")
    module.after_step(1)  # skipped: non-finite masks
    artifacts.on_exception(trainer, module, FloatingPointError("nan"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == good and module.schedule.updates == 0


def test_monitor_writes_metrics_csv_with_the_monitored_quantities(tmp_path):
    pm = tiny_pm()
    mon = Monitor(tmp_path, every=2, verbose=False)
    trainer = fake_trainer()
    module = SimpleNamespace(pm=pm, phase="acip", l1_weight=2e-3, last={"task_loss": 3.0, "l1_loss": 12.5,
                                                                       "l1_weight": 1e-3})
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long)}
    for step in (1, 2, 3, 4):
        trainer.global_step = step
        mon.on_train_batch_start(trainer, module, batch, 0)
        mon.on_train_batch_end(trainer, module, None, batch, 0)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    need = {"size_ratio", "l1_weight", "task_loss", "l1_loss", "step_time_s", "tokens_per_s"}
    assert need <= set(rows[0]) and any(k.startswith("rank/") for k in rows[0])
    assert float(rows[0]["size_ratio"]) == pytest.approx(1.0) and float(rows[0]["task_loss"]) == 3.0
    assert float(rows[0]["l1_weight"]) == 1e-3  # the weight the logged step used, not the next one
    assert int(rows[0][f"rank/{next(iter(pm.masks()))}"]) == next(iter(pm.masks().values())).numel()


def test_baselines_are_evaluated_without_the_trained_adapters():
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.fill_(0.05)
    ids = torch.randint(0, 50, (2, 8))
    sv = acip.ScoreMap.from_singular_values(pm)
    ev = evaluate_score_maps({"singular_values": (sv, {"adapters": False}), "acip": sv}, ids, [1.0], pm,
                             log=lambda *_: None)
    plain = acip.export(pm, ratio=1.0, score_map=sv, adapters=False)
    assert float(pm.svd_layers()[next(iter(pm.svd_layers()))].lora_B.mean()) == pytest.approx(0.05)  # untouched
    with torch.no_grad():  # the baseline is the untrained model: adapters left out, nothing else
        pm.model.eval()
        saved = [l.lora_B.clone() for l in pm.svd_layers().values()]
        for l in pm.svd_layers().values():
            l.lora_B.zero_()
        assert torch.allclose(plain(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5)
        for l, b in zip(pm.svd_layers().values(), saved):
            l.lora_B.copy_(b)
    from acip.eval.perplexity import perplexity

    assert ev["ppl"]["singular_values"][1.0] == pytest.approx(perplexity(plain, None, ids, progress=False), rel=1e-5)
    assert ev["ppl"]["acip"][1.0] != pytest.approx(ev["ppl"]["singular_values"][1.0], rel=1e-3)  # adapters folded
    assert metric_key("acip", 0.5) == "final/ppl_acip_r50"


def test_one_table_and_one_ratio_plot_for_runs_and_sweeps(tmp_path):
    cols = {"acip": {1.0: 10.0, 0.5: 20.123}, "sv": {1.0: 10.0, 0.5: float("inf")}}
    table = format_table(cols, ratios=[1.0, 0.5], suffix=" ppl")
    assert table.splitlines()[:2] == ["| ratio | acip ppl | sv ppl |", "|---:|---:|---:|"]
    assert "| 0.50 | 20.12 | inf |" in table
    swept = format_table({"singular values": {0.9: 4748000.0, 0.5: 12.3456}}, reference=26.85)
    assert swept.splitlines()[2:] == ["| dense | 26.85 |", "| 0.90 | 4748000.00 |", "| 0.50 | 12.35 |"]
    assert format_table({"a": {0.5: 1.0}, "b": {0.4: 2.0}}).splitlines()[2:] == ["| 0.50 | 1.00 |  |",
                                                                                  "| 0.40 |  | 2.00 |"]
    png = plot_ratio_curves(cols, tmp_path / "plots" / "ratio_vs_ppl.png", reference=9.0, title="tiny")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(png.parent.glob(".*.tmp"))
