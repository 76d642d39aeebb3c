"""The ACIP algorithm in the module: schedule, stop switch, post-tuning and score map, in one order."""
from __future__ import annotations

import warnings

import pytest
import torch

import acip
from acip.train.module import ACIPModule
from acip.train.schedule import ACIPSchedule, l1_weight_at
from helpers_train import tiny_base, tiny_pm


def test_l1_weight_is_multiplied_every_reg_every_steps():
    assert l1_weight_at(0, 1e-3, 1.01, 4) == pytest.approx(1e-3)
    assert l1_weight_at(3, 1e-3, 1.01, 4) == pytest.approx(1e-3)
    assert l1_weight_at(4, 1e-3, 1.01, 4) == pytest.approx(1.01e-3)
    assert l1_weight_at(400, 1e-3, 1.01, 4) == pytest.approx(1e-3 * 1.01**100)
    assert ACIPSchedule(1e-3, 2.0, 3).l1_weight_at(7) == pytest.approx(4e-3)


@pytest.mark.parametrize("kw, key", [({"reg_every": 0}, "reg_every"), ({"reg_factor": 0.0}, "reg_factor"),
                                     ({"l1_init": -1.0}, "l1_init"), ({"post_tune_steps": -1}, "post_tune_steps"),
                                     ({"max_steps": 0}, "max_steps"), ({"reg_every": "abc"}, "reg_every")])
def test_bad_schedule_values_are_named(kw, key):
    with pytest.raises(ValueError, match=f"acip.{key}"):
        ACIPSchedule(**{"l1_init": 1e-3, "reg_factor": 1.01, "reg_every": 1, **kw})


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, "abc", True])
def test_stop_ratio_outside_open_interval_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match=r"acip.stop_ratio must be (a number )?in \(0, 1\)"):
        ACIPSchedule(stop_ratio=bad)
    assert ACIPSchedule(stop_ratio=0.4).stop_ratio == 0.4


def test_stop_switches_to_post_tune_then_stops_after_post_tune_steps():
    s = ACIPSchedule(stop_ratio=0.5, post_tune_steps=3, max_steps=100)
    assert [s.advance(1, 0.9), s.advance(2, 0.6)] == ["continue", "continue"]
    assert s.advance(3, 0.45) == "post_tune" and s.phase == "post_tune" and s.stop_step == 3
    assert s.reached_ratio == 0.45 and s.post_tune_start == 3
    assert [s.advance(4, 0.45), s.advance(5, 0.45)] == ["continue", "continue"]
    assert s.advance(6, 0.45) == "stop" and s.post_tune_done(6) == 3
    again = ACIPSchedule(stop_ratio=0.5, post_tune_steps=3)  # resumes exactly from its state
    again.load_state_dict(s.state_dict())
    assert again.phase == "post_tune" and again.advance(6, 0.45) == "stop"


def test_without_post_tune_the_stop_ratio_ends_the_run_and_max_steps_caps_the_acip_phase():
    s = ACIPSchedule(stop_ratio=0.4)
    assert s.advance(7, 0.39) == "stop" and s.phase == "acip" and s.stop_step == 7
    capped = ACIPSchedule(stop_ratio=0.4, post_tune_steps=5, max_steps=10)
    assert capped.total_steps == 15 and capped.advance(9, 0.8) == "continue"
    with pytest.warns(UserWarning, match=r"acip.max_steps=10 .*without reaching it"):
        assert capped.advance(10, 0.8) == "stop"
    assert capped.stop_step is None and capped.phase == "acip"


def test_after_step_applies_the_score_update_rule_on_a_hand_made_example():
    pm = tiny_pm()
    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3)
    name = next(iter(pm.masks()))
    mask = pm.masks()[name]
    with torch.no_grad():  # step 1: entries 0, 1 drop to <= 0, entry 2 moves to 0.5
        mask[:3] = torch.tensor([-0.1, 0.0, 0.5])
    module.after_step(1)
    s = module.score_map.scores[name]
    assert s[:3].tolist() == pytest.approx([-1.0, -1.0, 0.5]) and s[3] == pytest.approx(0.02)
    with torch.no_grad():  # step 2: entry 2 drops; 0 and 1 keep counting down
        mask[2] = -0.3
    module.after_step(2)
    assert module.score_map.scores[name][:3].tolist() == pytest.approx([-2.0, -2.0, -1.0])
    module.schedule.phase = "post_tune"  # frozen masks: no more updates
    module.after_step(3)
    assert module.score_map.scores[name][:3].tolist() == pytest.approx([-2.0, -2.0, -1.0])
    assert module.schedule.updates == 2
    with torch.no_grad():  # a non-finite mask leaves the last good scores
        module.schedule.phase = "acip"
        mask[5] = float("nan")
    module.after_step(4)
    assert module.schedule.updates == 2 and torch.isfinite(module.score_map.scores[name]).all()


def test_the_step_that_reaches_the_stop_ratio_updates_the_score_map_before_post_tuning():
    """Was skipped when post_tune_steps > 0 (StopAtRatio switched the phase before the recorder ran)."""
    pm = tiny_pm(lora={"r": 2})
    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3, schedule=ACIPSchedule(stop_ratio=0.9, post_tune_steps=3))
    with torch.no_grad():
        for m in pm.masks().values():
            m[: m.numel() // 2] = -0.5  # this step prunes half of every layer: ratio <= 0.9
    assert module.after_step(1) is False and module.phase == "post_tune" and module.schedule.stop_step == 1
    for n, m in pm.masks().items():
        s = module.score_map.scores[n]
        assert torch.equal(s <= -1, m <= 0) and torch.equal(s[m > 0], m[m > 0].detach()), n
    assert [module.after_step(t) for t in (2, 3, 4)] == [False, False, True]


def test_lambda_for_the_next_step_is_set_after_the_step():
    module = ACIPModule(tiny_pm(), lr=1e-3, lora_lr=1e-3, schedule=ACIPSchedule(1e-2, 2.0, 2))
    assert module.l1_weight == pytest.approx(1e-2)  # step 0
    module.after_step(1)
    assert module.l1_weight == pytest.approx(1e-2)  # step 1 = floor(1/2) = 0
    module.after_step(2)
    assert module.l1_weight == pytest.approx(2e-2)


def test_checkpoint_round_trip_restores_schedule_and_scores():
    pm = tiny_pm()
    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3, schedule=ACIPSchedule(stop_ratio=0.5, post_tune_steps=2))
    with torch.no_grad():
        next(iter(pm.masks().values()))[:4] = -1.0
    module.after_step(1)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {n for n, p in module.named_parameters() if p.requires_grad}
    other = ACIPModule(tiny_pm(), lr=1e-3, lora_lr=1e-3, schedule=ACIPSchedule(stop_ratio=0.5, post_tune_steps=2))
    other.on_load_checkpoint(ckpt)
    assert other.schedule.updates == 1 and other.score_map.digest() == module.score_map.digest()
    with pytest.raises(KeyError, match="older acip"):
        other.on_load_checkpoint({"state_dict": {}})


def test_a_run_with_post_tuning_records_the_stop_step_and_freezes_the_masks(tmp_path):
    """End to end in a Trainer: the saved map equals ScoreMap.from_masks + update replayed over every acip step."""
    import lightning.pytorch as pl

    from acip.train.callbacks import RunArtifacts
    from test_train_module import tiny_data

    masks_after: list[dict[str, torch.Tensor]] = []

    class Spy(pl.Callback):  # callbacks run after the module's optimizer_step: masks of that step
        def on_train_batch_end(self, trainer, pl_module, *args):
            masks_after.append({n: m.detach().clone() for n, m in pl_module.pm.masks().items()})

    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # spread the initial masks so that directions drop out over many steps
        for m in pm.mask_parameters():
            m.mul_(torch.linspace(0.05, 1.0, m.numel())[torch.randperm(m.numel(), generator=g)])
    schedule = ACIPSchedule(l1_init=3e-3, reg_factor=1.2, reg_every=1, stop_ratio=0.9, post_tune_steps=4, max_steps=60)
    module = ACIPModule(pm, lr=1e-3, lora_lr=5e-3, schedule=schedule)
    replay = acip.ScoreMap.from_masks(pm)
    trainer = pl.Trainer(accelerator="cpu", max_steps=schedule.total_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[Spy(), RunArtifacts(tmp_path)])
    trainer.fit(module, datamodule=tiny_data(schedule.total_steps))
    stop = schedule.stop_step
    assert stop is not None and schedule.phase == "post_tune" and trainer.global_step == stop + 4
    before, at = masks_after[stop - 2], masks_after[stop - 1]
    assert sum(int(((at[n] <= 0) & (before[n] > 0)).sum()) for n in at) > 0  # the stop step pruned some
    for masks in masks_after[:stop]:  # every acip step, the stop step included
        replay.update(masks)
    assert replay.digest() == module.score_map.digest() and schedule.updates == stop
    assert all(torch.equal(masks_after[stop - 1][n], m) for n, m in masks_after[-1].items())  # frozen after
    saved = acip.load(tmp_path, model=tiny_base())
    assert saved.score_map.digest() == module.score_map.digest() and saved.score_map.meta["global_step"] == stop + 4
    for n, m in saved.masks().items():  # pruned at (or before) the stop step -> score <= -1
        assert torch.equal(saved.score_map.scores[n] <= -1, m <= 0), n


def test_sampled_ratio_is_a_pure_function_of_seed_and_step_inside_the_bounds():
    from acip.train.schedule import sampled_ratio

    draws = [sampled_ratio(0, t, 0.5, 1.0) for t in range(200)]
    assert draws == [sampled_ratio(0, t, 0.5, 1.0) for t in range(200)]  # a resumed run draws the same
    assert all(0.5 <= r < 1.0 for r in draws) and min(draws) < 0.55 and max(draws) > 0.95
    assert draws[:5] != [sampled_ratio(1, t, 0.5, 1.0) for t in range(5)] and sampled_ratio(4, 9, 0.7, 0.7) == 0.7


@pytest.mark.parametrize("ratios, match", [([0.0, 1.0], r"post_tune_ratios\[0\] must be in \(0, 1\]"),
                                           ([0.5, 1.2], r"post_tune_ratios\[1\] must be in \(0, 1\]"),
                                           ([0.9, 0.5], "lower bound is above the upper one"),
                                           ([0.5], r"must be \[lo, hi\]"), ("gaussian", r"or 'uniform'")])
def test_bad_post_tune_ratios_are_named_with_the_fix(ratios, match):
    with pytest.raises(ValueError, match=match):
        ACIPSchedule(stop_ratio=0.5, post_tune_steps=5, post_tune_ratios=ratios)


def test_post_tune_ratios_need_post_tuning_and_uniform_means_stop_ratio_to_one():
    with pytest.raises(ValueError, match="acip.post_tune_steps=0: set acip.post_tune_steps > 0"):
        ACIPSchedule(stop_ratio=0.5, post_tune_ratios=[0.5, 1.0])
    with pytest.raises(ValueError, match="there is no stop ratio"):
        ACIPSchedule(post_tune_steps=3, post_tune_ratios="uniform")
    s = ACIPSchedule.from_config({"l1_init": 1e-3, "reg_factor": 1.0, "reg_every": 1, "stop_ratio": 0.4,
                                  "post_tune_steps": 3, "max_steps": 9, "post_tune_ratios": "uniform"}, seed=7)
    assert s.post_tune_ratios == (0.4, 1.0) and s.seed == 7
    assert s.post_tune_ratio(5) is None  # the acip phase: no sampling
    s.advance(2, 0.39)
    resumed = ACIPSchedule(stop_ratio=0.4, post_tune_steps=3, post_tune_ratios=[0.4, 1.0], seed=7)
    resumed.load_state_dict(s.state_dict())
    assert s.post_tune_ratio(3) == resumed.post_tune_ratio(3) and 0.4 <= s.post_tune_ratio(3) < 1.0


def test_sampled_post_tuning_in_a_trainer_runs_each_step_at_its_ratio_and_trains_only_the_adapters():
    """Each post-tune step's forward sees the export at rho_t = sampled_ratio(seed, t); masks stay frozen."""
    import lightning.pytorch as pl

    from acip.train.schedule import sampled_ratio
    from test_train_module import tiny_data

    seen: list[tuple[int, float, float]] = []  # (step, logged ratio, the ratio the forward ran at)
    at_stop: dict[str, torch.Tensor] = {}
    lora_at_stop: list[torch.Tensor] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 1:  # the stop step: the masks freeze here
                at_stop.update({n: m.detach().clone() for n, m in pl_module.pm.masks().items()})
                lora_at_stop.extend(p.detach().clone() for p in pl_module.pm.lora_parameters())
            if "post_tune_ratio" in pl_module.last:
                seen.append((trainer.global_step - 1, pl_module.last["post_tune_ratio"], ratio_in_forward[-1]))

    ratio_in_forward: list[float] = []
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():  # half of every layer's directions already pruned by its mask
        for m in pm.mask_parameters():
            m[m.numel() // 2:] = -1.0
    mask_ratio = pm.size_ratio()
    schedule = ACIPSchedule(stop_ratio=0.99, post_tune_steps=5, max_steps=3, post_tune_ratios=[0.3, 1.0], seed=11)
    module = ACIPModule(pm, lr=1e-3, lora_lr=5e-3, schedule=schedule)
    orig = module.task_loss

    def spying_task_loss(ids):
        ratio_in_forward.append(pm.size_ratio())
        return orig(ids)

    module.task_loss = spying_task_loss
    trainer = pl.Trainer(accelerator="cpu", max_steps=schedule.total_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[Spy()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ratios below this tiny run's stop ratio warn
        trainer.fit(module, datamodule=tiny_data(schedule.total_steps))
        assert schedule.stop_step == 1 and trainer.global_step == 6 and len(seen) == 5
        for step, logged, in_forward in seen:
            want = sampled_ratio(11, step, 0.3, 1.0)
            assert logged == want
            with pm.at_ratio(want, module.score_map):  # the forward ran at exactly that export's ranks
                assert in_forward == pm.size_ratio()
    assert len({round(r, 3) for _, _, r in seen}) > 1  # the ratio changes from step to step
    assert max(r for _, _, r in seen) > mask_ratio + 0.05  # pruned directions came back above the masks' ratio
    assert at_stop and all(torch.equal(m, at_stop[n]) for n, m in pm.masks().items())  # frozen, restored exactly
    assert all(l.keep is None for l in pm.svd_layers().values()) and pm.size_ratio() == mask_ratio
    assert any(not torch.equal(a, b) for a, b in zip(pm.lora_parameters(), lora_at_stop))  # the adapters trained


def test_the_run_config_passes_post_tune_ratios_to_the_schedule():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from acip.train.run import validate

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("compress", overrides=["experiment=tiny", "acip.post_tune_steps=4",
                                             "acip.post_tune_ratios=[0.6,0.9]", "seed=7"])
        bad = compose("compress", overrides=["experiment=tiny", "acip.post_tune_ratios=[0.6,0.9]"])
    schedule = validate(cfg)["schedule"]
    assert schedule.post_tune_ratios is not None and list(schedule.post_tune_ratios) == [0.6, 0.9]
    assert schedule.seed == 7  # the sampled ratios follow the run's seed
    with pytest.raises(ValueError, match="post_tune_steps"):  # set without post-tuning: refused, never ignored
        validate(bad)
