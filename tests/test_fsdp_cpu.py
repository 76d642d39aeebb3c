"""trainer=fsdp: the auto-wrap policy (one FSDP unit per decoder block), the SVD factors sharded (frozen
parameters) with masks and LoRA factors outside the shards, and two CPU processes (gloo) running the tiny model
end to end: each rank holds half of the factors, and LoRA adapters, post-tuning, the final evaluation and the
logged size ratios equal the DDP run of the same seed; ``resume=`` of an FSDP run against the uninterrupted one;
and gradient clipping by norm against DDP's."""
from __future__ import annotations

import shutil
import sys

import pytest
from omegaconf import OmegaConf

from acip.train.scale import DecoderBlockPolicy, fsdp_strategy
from helpers_train import child_env, run_compress, tiny_pm

FSDP_ARGS = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
# the tiny default LoRA (r=4), a few post-tune steps, and a small final evaluation (one ratio, two windows)
RUN_ARGS = ("experiment=tiny", "data.max_train_texts=1500", "data.max_heldout_texts=200", "acip.post_tune_steps=3",
            "eval.ratios=[0.5]", "eval.max_windows=2", "eval.val_windows=2")
# Measured on this CPU (2 gloo processes, 2026-12-01): the FSDP run's 28 LoRA factors equal the DDP run's bit for
# bit (max |diff| 0), and so do its perplexities. With two ranks FSDP's reduce-scatter (gradients pre-divided by
# 2) and DDP's all-reduce (sum, then / 2) compute the same (a + b) / 2 exactly. The tolerance leaves room for
# kernel-level rounding only (BLAS results may depend on how the views into FSDP's flat parameter are aligned):
# 1e-6 is 100-1000 float32 ulps of the factors' entries (|x| 1e-2 to 1e-1, measured), while one missed or
# doubled Adam step moves them by about acip.lora_lr = 1e-3.
LORA_ATOL = 1e-6
PPL_RTOL = 1e-6


def test_policy_wraps_each_decoder_block_and_nothing_else():
    pm = tiny_pm()
    policy = DecoderBlockPolicy()
    assert policy(pm, recurse=True, nonwrapped_numel=0)  # the root: descend, and learn the block classes
    assert policy.names == {"LlamaDecoderLayer"}
    wrapped = [n for n, m in pm.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["model.model.layers.0"] or wrapped == [n for n, _ in pm.named_modules()
                                                               if n.endswith("layers.0")]
    assert not policy(pm.svd_layers()[next(iter(pm.svd_layers()))], recurse=False, nonwrapped_numel=0)
    strategy = fsdp_strategy()
    assert isinstance(strategy.kwargs.get("use_orig_params"), bool) and strategy.kwargs["use_orig_params"]


def _module_under(strategy, lora=None):
    """An ACIPModule of the tiny model whose (fake) trainer runs ``strategy``, as ``configure_model`` sees it."""
    from types import SimpleNamespace

    from acip.train.module import ACIPModule

    module = ACIPModule(tiny_pm(lora), lr=1e-3, lora_lr=1e-3)
    module._trainer = SimpleNamespace(strategy=strategy, callbacks=[])
    return module


def test_shard_setup_makes_the_factors_frozen_parameters_and_keeps_the_trainable_tensors_replicated():
    import torch

    from acip.train.scale import ReplicatedGradSync, ShardReport, factor_numels, factors_as_parameters, shard_setup

    lora = {"r": 2, "lora_alpha": 4}
    module = _module_under(fsdp_strategy(), lora)
    pm = module.pm
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        pm.get_submodule("model.model.layers.0.mlp.down_proj").lora_B.normal_()  # the adapter takes part
        before_out = pm(x).logits
    before_state = {k: v.clone() for k, v in pm.state_dict().items()}
    before = {"trainable": [id(p) for p in pm.trainable_parameters()], "ratio": pm.size_ratio(full=True),
              "numels": factor_numels(pm), "groups": [[id(p) for p in g["params"]]
                                                       for g in module.configure_optimizers().param_groups]}
    n_layers = len(pm.svd_layers())
    assert before["numels"]["held"] == before["numels"]["total"] == sum(
        l.ortho.numel() + l.base.numel() for l in pm.svd_layers().values())
    shard_setup(module)
    layer = next(iter(pm.svd_layers().values()))
    assert {n for n, _ in layer.named_parameters(recurse=False)} >= {"ortho", "base", "mask", "lora_A", "lora_B"}
    assert "ortho" not in layer._buffers and "base" not in layer._buffers and "singular_values" in layer._buffers
    assert not layer.ortho.requires_grad and not layer.base.requires_grad
    # the same names and values, the same output; nothing that counts or trains parameters sees a difference
    after_state = pm.state_dict()
    assert sorted(after_state) == sorted(before_state)
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    with torch.no_grad():
        assert torch.equal(pm(x).logits, before_out)
    assert [id(p) for p in pm.trainable_parameters()] == before["trainable"]
    assert pm.size_ratio(full=True) == before["ratio"] and factor_numels(pm) == before["numels"]
    assert [[id(p) for p in g["params"]] for g in module.configure_optimizers().param_groups] == before["groups"]
    # FSDP leaves out exactly the masks and LoRA factors (replicated), and their gradients are averaged
    ignored = module._trainer.strategy.kwargs["ignored_states"]
    assert [id(p) for p in ignored] == [id(p) for p in module.trainable()] and len(ignored) == 3 * n_layers
    assert [type(cb) for cb in module._trainer.callbacks] == [ReplicatedGradSync, ShardReport]
    assert module._trainer.strategy.replicated == {id(p) for p in ignored}  # ClipAfterSync: whole on every rank
    # every parameter's whole size was recorded before wrapping (the factors, parameters only since, not counted)
    factors = {id(t) for l in pm.svd_layers().values() for t in (l.ortho, l.base, l.bias) if t is not None}
    assert {id(p) for p, _ in pm._pinned_numels} == {id(p) for p in pm.model.parameters() if id(p) not in factors}
    assert factors_as_parameters(pm) == 0  # idempotent
    with pytest.raises(TypeError, match="ACIPModel"):
        factors_as_parameters(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="shard_factors"):
        fsdp_strategy(shard_factors="yes")


def test_shard_setup_without_shard_factors_and_outside_fsdp_leaves_the_buffers():
    from lightning.pytorch.strategies import DDPStrategy

    from acip.train.scale import shard_setup

    lora = {"r": 2, "lora_alpha": 4}
    ddp = _module_under(DDPStrategy(), lora)
    shard_setup(ddp)  # not FSDP: nothing changes
    layer = next(iter(ddp.pm.svd_layers().values()))
    assert {"ortho", "base"} <= set(layer._buffers) and "ortho" not in layer._parameters
    assert ddp._trainer.callbacks == []
    fsdp = _module_under(fsdp_strategy(shard_factors=False), lora)
    shard_setup(fsdp)  # the factors stay buffers; only the masks outside the shards (LoRA sharded with its block)
    layer = next(iter(fsdp.pm.svd_layers().values()))
    assert {"ortho", "base"} <= set(layer._buffers) and "ortho" not in layer._parameters
    ignored = fsdp._trainer.strategy.kwargs["ignored_states"]
    assert [id(p) for p in ignored] == [id(p) for p in fsdp.pm.mask_parameters()]
    assert fsdp._trainer.strategy.replicated == {id(p) for p in ignored}  # LoRA: sharded, clipped by FSDP's norm


def test_the_fsdp_strategy_clips_by_norm_where_lightnings_fsdp_precision_refuses():
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.plugins.precision import FSDPPrecision

    from acip.train.scale import ClipAfterSync

    with pytest.raises(MisconfigurationException, match="norm"):
        FSDPPrecision("32-true").clip_grad_by_norm(None, 1.0)  # why ClipAfterSync exists
    strategy = fsdp_strategy()
    assert isinstance(strategy.precision_plugin, ClipAfterSync) and strategy.precision_plugin.strategy is strategy
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")  # what Lightning's connector sets
    plugin = strategy.precision_plugin
    assert type(plugin) is ClipAfterSync and plugin.precision == "bf16-mixed" and plugin.strategy is strategy


def test_fsdp_config_builds_the_acip_strategy():
    from hydra import compose, initialize_config_dir

    from acip.train.run import _world

    with initialize_config_dir(config_dir=str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf"),
                               version_base="1.3"):
        cfg = compose("compress", overrides=["experiment=tiny", *FSDP_ARGS])
    assert cfg.trainer.strategy._target_ == "acip.train.scale.fsdp_strategy"
    assert _world(cfg) == 2
    assert OmegaConf.select(cfg, "trainer.precision") == "32-true"
    from acip.train.run import validate

    cfg.eval.enabled = True  # the final evaluation and LoRA adapters gather the full parameters: accepted
    cfg.acip.lora = {"r": 4, "lora_alpha": 8}
    assert validate(cfg)["acip_config"].lora is not None


def test_rank_zero_with_full_params_outside_fsdp_runs_the_work_on_rank_zero_only():
    from types import SimpleNamespace

    import pytest

    from acip.train.scale import is_fsdp, rank_zero_with_full_params

    met = []
    strategy = SimpleNamespace(barrier=met.append)  # not FSDP: nothing is gathered
    zero = SimpleNamespace(is_global_zero=True, world_size=2, strategy=strategy)
    other = SimpleNamespace(is_global_zero=False, world_size=2, strategy=strategy)
    assert not is_fsdp(zero) and not is_fsdp(SimpleNamespace())
    assert rank_zero_with_full_params(zero, None, lambda: 7) == 7 and met == []  # no barrier unless named
    assert rank_zero_with_full_params(other, None, lambda: 1 / 0, barrier="b") is None and met == ["b"]
    single = SimpleNamespace(is_global_zero=True, world_size=1)
    assert rank_zero_with_full_params(single, None, lambda: "x", barrier="b") == "x" and met == ["b"]
    with pytest.raises(TypeError, match="callable"):
        rank_zero_with_full_params(zero, None, 7)
    with pytest.raises(TypeError, match="barrier"):
        rank_zero_with_full_params(zero, None, lambda: 7, barrier=1)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One finished FSDP run (2 CPU processes) of :data:`RUN_ARGS`, shared by the tests below."""
    fsdp_dir = tmp_path_factory.mktemp("fsdp") / "run"
    cmd = [sys.executable, "-m", "acip.compress", *RUN_ARGS, f"hydra.run.dir={fsdp_dir}", *FSDP_ARGS]
    proc = run_compress(fsdp_dir, cmd=cmd, env=child_env(WANDB_MODE="disabled"), timeout=900)
    # both ranks' score-map digests are gathered at the end (ReplicaMismatchError if they differ)
    assert "ReplicaMismatchError" not in proc.stderr
    (fsdp_dir.parent / "output.txt").write_text(proc.stdout + proc.stderr)
    return fsdp_dir


def shard_report(output: str) -> dict:
    """The ``[acip] fsdp shards {json}`` line a run printed (:class:`acip.train.scale.ShardReport`)."""
    import json
    import re

    found = re.findall(r"^\[acip\] fsdp shards (\{.*\})$", output, flags=re.M)
    assert len(found) == 1, f"expected one shard report, found {len(found)}"
    return json.loads(found[0])


# The tiny model's two decoder blocks each hold, beside their SVD factors (59,392 elements), two RMSNorm weights
# of 64 in their flat parameter; FSDP cuts each flat parameter in two equal halves (the last one padded), so a
# rank's share of the factors is half of them up to 2 * 64 (+ 1 padding) elements per block.
SHARD_SLACK = 2 * (2 * 64 + 1)


def check_shards(report: dict, trainable_numel: int) -> None:
    """Every rank holds about half of the SVD factors, and gradients of the trainable tensors alone."""
    ranks, total = report["ranks"], report["total"]
    assert report["world_size"] == len(ranks) == 2 and report["shard_factors"] is True
    assert total == 2 * 59_392 and sum(r["held"] for r in ranks) == total  # every element on exactly one rank
    for i, r in enumerate(ranks):
        assert abs(r["held"] - total / 2) <= SHARD_SLACK, (i, r["held"], total)
        assert r["held_bytes"] == 4 * r["held"]  # fp32
        # no gradient memory for the frozen factors: every flat parameter is frozen, and the only gradients
        # are the replicated masks' and LoRA factors'
        assert r["frozen_with_grad"] == 0 and r["flat_params_with_grad"] == 0 and r["flat_grad_numel"] == 0, (i, r)
        assert r["grad_numel"] == trainable_numel, (i, r["grad_numel"], trainable_numel)


def size_ratios(run_dir) -> list[tuple[int, str, str]]:
    """``(step, size_ratio, size_ratio_full)`` of every row of a run's ``metrics.csv`` (the monitor's, rank 0),
    the ratios as the exact text written."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["size_ratio"], r["size_ratio_full"]) for r in csv.DictReader(f)]


def _optimizer_states(ckpt: dict) -> list[dict]:
    """Per parameter, in optimizer order (group by group), its saved Adam state: the ids differ between
    strategies (FSDP keys by model parameter, DDP by position), the order does not."""
    opt = ckpt["optimizer_states"][0]
    return [opt["state"][i] for g in opt["param_groups"] for i in g["params"]]


def test_fsdp_two_cpu_processes_with_lora_post_tune_and_eval_match_the_ddp_run(fsdp_run, tmp_path):
    import json

    import torch

    import acip
    from acip.core.io import read_tensors
    from acip.core.parametrize import STATE_FILE

    fsdp_dir, ddp_dir = fsdp_run, tmp_path / "ddp"
    cmd = [sys.executable, "-m", "acip.compress", *RUN_ARGS, f"hydra.run.dir={ddp_dir}", "trainer=ddp",
           "trainer.devices=2"]
    run_compress(ddp_dir, cmd=cmd, env=child_env(WANDB_MODE="disabled"), timeout=900)
    fsdp_map = acip.ScoreMap.load(fsdp_dir / "score_map.safetensors")
    ddp_map = acip.ScoreMap.load(ddp_dir / "score_map.safetensors")
    assert fsdp_map.meta["updates"] == ddp_map.meta["updates"] > 0
    assert fsdp_map.digest() == ddp_map.digest()  # the same run, bit for bit
    assert fsdp_map.meta["global_step"] == ddp_map.meta["global_step"]
    # the logged size ratios, the full one included: whole parameters counted, not rank 0's shard of them
    # (before ACIPModel.pin_numels the FSDP run logged size_ratio_full 0.8698 at step 10, the DDP run 0.8902)
    ratios = size_ratios(fsdp_dir)
    assert len(ratios) >= 3 and ratios == size_ratios(ddp_dir), (ratios, size_ratios(ddp_dir))
    assert all(float(full) > float(r) for _, r, full in ratios if float(r) < 1)  # the untouched layers count
    # the saved adapters: whole tensors (not a rank's flat shard), equal to the DDP run's
    fsdp_state, ddp_state = (read_tensors(d / STATE_FILE)[0] for d in (fsdp_dir, ddp_dir))
    lora = sorted(k for k in ddp_state if k.endswith((".lora_A", ".lora_B")))
    assert len(lora) == 28 and lora == sorted(k for k in fsdp_state if k.endswith((".lora_A", ".lora_B")))
    diff = max(float((fsdp_state[k] - ddp_state[k]).abs().max()) for k in lora)
    print(f"[fsdp vs ddp] LoRA max |diff| {diff:.3g} over {len(lora)} tensors")
    for k in lora:
        assert fsdp_state[k].shape == ddp_state[k].shape and fsdp_state[k].dim() == 2, k
        torch.testing.assert_close(fsdp_state[k], ddp_state[k], rtol=0, atol=LORA_ATOL, msg=k)
    assert any(float(ddp_state[k].abs().max()) > 0 for k in lora if k.endswith(".lora_B"))  # trained
    # the final evaluation ran on rank 0 with the full parameters: the DDP run's figures
    fsdp_res, ddp_res = (json.loads((d / "results.json").read_text()) for d in (fsdp_dir, ddp_dir))
    assert fsdp_res["world_size"] == 2 and fsdp_res["post_tune_steps"] == 3 and fsdp_res["reached_stop_ratio"]
    assert fsdp_res["adapters_auto"] == ddp_res["adapters_auto"] is not None
    for dom in ("ppl", "val_ppl"):
        for method, col in ddp_res[dom].items():
            for r, v in col.items():
                assert abs(fsdp_res[dom][method][r] - v) <= PPL_RTOL * v, (dom, method, r, fsdp_res[dom][method][r], v)
    # the Lightning checkpoints (resume=) hold the same trainable tensors as DDP's, under the same names
    ckpts = [torch.load(sorted((d / "checkpoints").glob("*.ckpt"))[-1], map_location="cpu", weights_only=False)
             for d in (fsdp_dir, ddp_dir)]
    states = [c["state_dict"] for c in ckpts]
    assert len(states[1]) > 0 and sorted(states[0]) == sorted(states[1])
    for k, v in states[1].items():
        torch.testing.assert_close(states[0][k], v, rtol=0, atol=LORA_ATOL, msg=k)
    # ... and the same Adam state, each moment its own tensor (on CPU the gathered moments of a flat
    # parameter used to share one buffer: exp_avg held exp_avg_sq, and resume= went astray)
    opts = [_optimizer_states(c) for c in ckpts]
    assert len(opts[0]) == len(opts[1]) == len(states[1])
    for i, (got, want) in enumerate(zip(*opts)):
        assert sorted(got) == sorted(want) and got["exp_avg"].data_ptr() != got["exp_avg_sq"].data_ptr(), i
        for key, v in want.items():
            torch.testing.assert_close(got[key], v, rtol=0, atol=LORA_ATOL, msg=f"{i} {key}")
    # FSDP sharded the SVD factors: each rank held half of them (DDP: every rank holds all of them)
    report = shard_report((fsdp_dir.parent / "output.txt").read_text())
    trainable = sum(v.numel() for k, v in fsdp_state.items() if k.endswith((".mask", ".lora_A", ".lora_B")))
    check_shards(report, trainable)
    print(f"[fsdp] SVD-factor elements held per rank {[r['held'] for r in report['ranks']]} of {report['total']}")
    # the run directory loads and exports like a single-process one
    pm = acip.load(fsdp_dir)
    assert pm.has_trained_adapters() and pm.size_ratio() <= 0.5 + 1e-6
    assert pm.score_map.meta.get("adapters_auto") == ddp_map.meta.get("adapters_auto")
    small = acip.export(fsdp_dir, 0.5)
    assert abs(small.config.acip_export["measured_ratio"] - fsdp_res["measured_ratio"]["acip"]["0.5"]) < 1e-9


def test_fsdp_run_resumed_from_a_checkpoint_matches_the_uninterrupted_run(fsdp_run, tmp_path):
    """What a run killed after its step-10 checkpoint leaves (its config.yaml and that checkpoint; the step-15
    one, the run-directory files and results.json not yet written), resumed with ``resume=``: it crosses the
    stop ratio (step 12) and the post-tune phase and ends as the uninterrupted run does, bit for bit."""
    import json

    import torch

    import acip
    from acip.core.io import read_tensors
    from acip.core.parametrize import STATE_FILE
    from helpers_train import resume_cmd

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(fsdp_run / "config.yaml", run / "config.yaml")
    shutil.copy(fsdp_run / "checkpoints" / "step000010.ckpt", run / "checkpoints")
    proc = run_compress(run, cmd=resume_cmd(run), env=child_env(WANDB_MODE="disabled"), timeout=900)
    assert "ReplicaMismatchError" not in proc.stderr
    got, want = (acip.ScoreMap.load(d / "score_map.safetensors") for d in (run, fsdp_run))
    assert got.meta["global_step"] == want.meta["global_step"] == 15 and got.meta["updates"] == want.meta["updates"]
    assert got.digest() == want.digest()
    # every trainable tensor (masks, LoRA factors) and the basis: the uninterrupted run's, bit for bit
    got_state, want_state = (read_tensors(d / STATE_FILE)[0] for d in (run, fsdp_run))
    assert sorted(got_state) == sorted(want_state)
    for k, v in want_state.items():
        assert torch.equal(got_state[k], v), k
    trainable = sum(v.numel() for k, v in want_state.items() if k.endswith((".mask", ".lora_A", ".lora_B")))
    check_shards(shard_report(proc.stdout + proc.stderr), trainable)  # the resumed run shards the same way
    res, ref = (json.loads((d / "results.json").read_text()) for d in (run, fsdp_run))
    assert res["ppl"] == ref["ppl"] and res["val_ppl"] == ref["val_ppl"] and res["stop_step"] == ref["stop_step"]


CLIP_ARGS = (*RUN_ARGS, "eval.enabled=false", "trainer.gradient_clip_val=1.0")


def test_fsdp_gradient_clipping_by_norm_matches_the_ddp_run(fsdp_run, tmp_path):
    """``trainer.gradient_clip_val`` under trainer=fsdp (Lightning's own FSDPPrecision refuses it): the
    global norm over every trainable tensor after the gradient all-reduce, as DDP clips. With the default
    sharded factors (masks and LoRA replicated) the run is the DDP run's bit for bit; with
    ``shard_factors=false`` (LoRA gradients sharded: torch's FSDP norm) equal to rounding. Clipping at 1.0
    changes the run (the score map differs from the unclipped FSDP run's)."""
    import torch

    import acip
    from acip.core.io import read_tensors
    from acip.core.parametrize import STATE_FILE

    runs = {"ddp": ("trainer=ddp", "trainer.devices=2"), "fsdp": FSDP_ARGS,
            "fsdp_lora_sharded": (*FSDP_ARGS, "trainer.strategy.shard_factors=false")}
    for name, args in runs.items():
        run = tmp_path / name
        cmd = [sys.executable, "-m", "acip.compress", *CLIP_ARGS, f"hydra.run.dir={run}", *args]
        proc = run_compress(run, cmd=cmd, env=child_env(WANDB_MODE="disabled"), timeout=900)
        assert "ReplicaMismatchError" not in proc.stderr
    maps = {n: acip.ScoreMap.load(tmp_path / n / "score_map.safetensors") for n in runs}
    states = {n: read_tensors(tmp_path / n / STATE_FILE)[0] for n in runs}
    ddp_map, ddp_state = maps["ddp"], states["ddp"]
    assert ddp_map.digest() != acip.ScoreMap.load(fsdp_run / "score_map.safetensors").digest()  # clipping acted
    assert maps["fsdp"].digest() == ddp_map.digest() and maps["fsdp"].meta["updates"] == ddp_map.meta["updates"]
    trained = sorted(k for k in ddp_state if k.endswith((".mask", ".lora_A", ".lora_B")))
    assert len(trained) == 42 and any(float(ddp_state[k].abs().max()) > 0 for k in trained if k.endswith(".lora_B"))
    for name in ("fsdp", "fsdp_lora_sharded"):
        assert sorted(k for k in states[name] if k in trained) == trained
        diff = max(float((states[name][k] - ddp_state[k]).abs().max()) for k in trained)
        print(f"[fsdp clip vs ddp clip] {name}: masks and LoRA max |diff| {diff:.3g} over {len(trained)} tensors")
        for k in trained:
            torch.testing.assert_close(states[name][k], ddp_state[k], rtol=0, atol=LORA_ATOL, msg=f"{name} {k}")
        assert size_ratios(tmp_path / name) == size_ratios(tmp_path / "ddp"), name
    # measured: 0 for "fsdp" (the same clip_grad_norm_ call on the same averaged gradients), ~1e-8 with LoRA sharded
    assert all(torch.equal(states["fsdp"][k], ddp_state[k]) for k in trained)
    got = maps["fsdp_lora_sharded"]
    assert got.meta["updates"] == ddp_map.meta["updates"]
    for k, v in ddp_map.scores.items():
        torch.testing.assert_close(got.scores[k], v, rtol=0, atol=LORA_ATOL, msg=k)
