"""Each callback of the ACIP run on its own, against a tiny parametrized model and a fake trainer."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

import acip
from acip.train.callbacks import Monitor, PostTuning, RegularizationSchedule, ScoreMapRecorder, StopAtRatio
from acip.train.callbacks.final_eval import evaluate_score_maps, format_table, metric_key
from acip.train.callbacks.schedule import l1_weight_at
from acip.train.callbacks.stopping import check_stop_ratio


def tiny_pm(lora: dict | None = None) -> acip.ACIPModel:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return acip.parametrize(AutoModelForCausalLM.from_config(cfg), lora=lora)


def fake(step: int = 0, pm=None, phase: str = "acip"):
    trainer = SimpleNamespace(global_step=step, should_stop=False, is_global_zero=True, world_size=1,
                              loggers=[], optimizers=[])
    module = SimpleNamespace(pm=pm, phase=phase, l1_weight=0.0, post_tune_start=-1, last={})

    def enter_post_tune(start: int) -> None:
        module.phase, module.post_tune_start = "post_tune", start

    module.enter_post_tune = enter_post_tune
    return trainer, module


def test_schedule_multiplies_every_n_steps_and_sets_module_weight():
    assert l1_weight_at(0, 1e-3, 1.01, 4) == pytest.approx(1e-3)
    assert l1_weight_at(3, 1e-3, 1.01, 4) == pytest.approx(1e-3)
    assert l1_weight_at(4, 1e-3, 1.01, 4) == pytest.approx(1.01e-3)
    assert l1_weight_at(400, 1e-3, 1.01, 4) == pytest.approx(1e-3 * 1.01**100)
    cb = RegularizationSchedule(1e-3, 2.0, 3)
    trainer, module = fake(step=7)
    cb.on_train_batch_start(trainer, module, None, 0)
    assert module.l1_weight == pytest.approx(4e-3) and cb.state_dict()["l1_weight"] == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="reg_every"):
        RegularizationSchedule(1e-3, 1.01, 0)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, "abc"])
def test_stop_ratio_outside_open_interval_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match=r"stop_ratio.*\(0, 1\)"):
        check_stop_ratio(bad)
    assert check_stop_ratio(0.4) == 0.4


def test_stop_at_ratio_switches_to_post_tune_then_post_tuning_stops_after_n_steps():
    ratios = iter([0.9, 0.6, 0.45])
    pm = SimpleNamespace(size_ratio=lambda: next(ratios))
    stop, post = StopAtRatio(0.5, post_tune_steps=3), PostTuning(3)
    trainer, module = fake(pm=pm)
    for step in (1, 2, 3):
        trainer.global_step = step
        stop.on_train_batch_end(trainer, module, None, None, 0)
        post.on_train_batch_end(trainer, module, None, None, 0)
    assert module.phase == "post_tune" and stop.stop_step == 3 and stop.reached_ratio == 0.45
    assert not trainer.should_stop
    for step in (4, 5):
        trainer.global_step = step
        post.on_train_batch_end(trainer, module, None, None, 0)
        assert not trainer.should_stop
    trainer.global_step = 6
    post.on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.should_stop and post.done == 3


def test_stop_at_ratio_without_post_tune_stops_the_run():
    trainer, module = fake(pm=SimpleNamespace(size_ratio=lambda: 0.39))
    StopAtRatio(0.4).on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.should_stop and module.phase == "acip"


def test_score_map_recorder_applies_the_update_rule_on_a_hand_made_example(tmp_path):
    pm = tiny_pm()
    name = next(iter(pm.masks()))
    rec = ScoreMapRecorder(tmp_path, stop_ratio=0.5)
    trainer, module = fake(pm=pm)
    rec.on_train_start(trainer, module)
    mask = pm.masks()[name]
    with torch.no_grad():  # step 1: entries 0, 1 drop to <= 0, entry 2 moves to 0.5
        mask[:3] = torch.tensor([-0.1, 0.0, 0.5])
    rec.on_train_batch_end(trainer, module, None, None, 0)
    s = rec.score_map.scores[name]
    assert s[:3].tolist() == pytest.approx([-1.0, -1.0, 0.5]) and s[3] == pytest.approx(0.02)
    with torch.no_grad():  # step 2: entry 2 drops; 0 and 1 keep counting down
        mask[2] = -0.3
    rec.on_train_batch_end(trainer, module, None, None, 0)
    assert rec.score_map.scores[name][:3].tolist() == pytest.approx([-2.0, -2.0, -1.0])
    module.phase = "post_tune"  # frozen masks: no more updates
    rec.on_train_batch_end(trainer, module, None, None, 0)
    assert rec.score_map.scores[name][:3].tolist() == pytest.approx([-2.0, -2.0, -1.0]) and rec.updates == 2
    # checkpoint state round trip, then the files written atomically at the end
    state = rec.state_dict()
    rec2 = ScoreMapRecorder(tmp_path, stop_ratio=0.5)
    rec2.load_state_dict(state)
    rec2.on_train_start(trainer, module)
    assert torch.equal(rec2.score_map.scores[name], rec.score_map.scores[name])
    rec2.on_train_end(trainer, module)
    loaded = acip.ScoreMap.load(tmp_path / "score_map.safetensors")
    assert torch.equal(loaded.scores[name], rec.score_map.scores[name])
    assert loaded.meta["adapters"] == "adapters" and (tmp_path / "adapters" / "acip_adapters.safetensors").is_file()
    assert not list(tmp_path.glob(".*.tmp"))


def test_score_map_recorder_keeps_last_good_file_when_masks_turn_nan(tmp_path):
    pm = tiny_pm()
    rec = ScoreMapRecorder(tmp_path)
    trainer, module = fake(pm=pm)
    rec.on_train_start(trainer, module)
    rec.on_train_end(trainer, module)
    good = (tmp_path / "score_map.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(pm.masks().values()))[0] = float("nan")
    rec.on_train_batch_end(trainer, module, None, None, 0)  # skipped: non-finite masks
    rec.on_exception(trainer, module, FloatingPointError("nan"))
    assert (tmp_path / "score_map.safetensors").read_bytes() == good and rec.updates == 0


def test_monitor_writes_metrics_csv_with_the_monitored_quantities(tmp_path):
    pm = tiny_pm()
    mon = Monitor(tmp_path, every=2, verbose=False)
    trainer, module = fake(pm=pm)
    module.last = {"task_loss": 3.0, "l1_loss": 12.5}
    module.l1_weight = 1e-3
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
    assert int(rows[0][f"rank/{next(iter(pm.masks()))}"]) == next(iter(pm.masks().values())).numel()


def test_baselines_are_evaluated_without_the_trained_adapters_and_table_formatting():
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.fill_(0.05)
    ids = torch.randint(0, 50, (2, 8))
    sv = acip.ScoreMap.from_singular_values(pm)
    ev = evaluate_score_maps({"singular_values": (sv, {"adapters": False}), "acip": sv}, ids, [1.0], pm,
                             log=lambda *_: None)
    plain = acip.export(sv, ratio=1.0, model=pm, adapters=False)
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
    table = format_table([1.0, 0.5], {"acip": {1.0: 10.0, 0.5: 20.123}, "sv": {1.0: 10.0, 0.5: float("inf")}})
    assert "| 0.50 | 20.12 | inf |" in table
