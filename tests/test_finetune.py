"""acip.finetune: LoRA on an export's factors, merged exactly; the CLI on a tiny run, read back by acip.load."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import acip
from acip.core import LowRankLinear, ScoreMap
from acip.finetune import LoRALinear, add_lora, finetune, merge_lora
from helpers_train import child_env, tiny_run


def _export(ratio=0.5):
    pm = acip.parametrize(tiny_model("llama"))
    return acip.export(pm, ratio, score_map=ScoreMap.from_singular_values(pm))


def test_lora_wraps_every_factor_and_merges_exactly():
    small = _export()
    layout = dict(small.config.acip_layout)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = small(input_ids=ids).logits
    wrapped = add_lora(small, r=2, alpha=4)
    low = [n for n, e in layout.items() if e["kind"] == "lowrank" and e["rank"] > 0]
    assert low and all(f"{n}.down" in wrapped and f"{n}.up" in wrapped for n in low)
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids).logits, ref)  # B = 0: exactly the export
        for m in wrapped.values():
            m.lora_B.normal_(std=0.1)
        tuned = small(input_ids=ids).logits
    assert not torch.allclose(tuned, ref, atol=1e-3)
    merge_lora(small, wrapped)
    assert not any(isinstance(m, LoRALinear) for m in small.modules())
    assert all(isinstance(small.get_submodule(n), LowRankLinear) for n in low)
    with torch.no_grad():
        assert torch.allclose(small(input_ids=ids).logits, tuned, atol=1e-4)
    assert small.config.acip_layout == layout and acip.size_ratio(small) <= 0.5


def test_finetune_lowers_the_training_loss_and_is_deterministic():
    torch.manual_seed(0)
    windows = torch.randint(0, 12, (16, 24))  # a small vocabulary: easy to fit
    recs, outs = [], []
    ids = windows[:2]
    for _ in range(2):
        small = _export()
        recs.append(finetune(small, windows, 30, lr=5e-3, r=4, batch_size=4, log=None))
        with torch.no_grad():
            outs.append(small(input_ids=ids).logits)
    assert recs[0]["loss_last"] < recs[0]["loss_first"] and recs[0]["adapters"] > 0
    assert torch.equal(outs[0], outs[1]) and recs[0]["loss_last"] == recs[1]["loss_last"]
    with pytest.raises(ValueError, match="acip_layout"):
        finetune(tiny_model("llama"), windows, 1, log=None)


def test_finetune_cli_on_a_tiny_run_saves_a_model_acip_load_reads(tmp_path):
    run = tiny_run()
    out = tmp_path / "ft"
    proc = subprocess.run([sys.executable, "-m", "acip.finetune", str(run), "ratio=0.6", "steps=6", "seq_len=32",
                           "eval_windows=4", f"out={out}"], env=child_env(), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "held-out perplexity" in proc.stdout
    model = acip.load(out)  # manifest verified
    rec = model.config.acip_export["finetune"]
    assert rec["steps"] == 6 and rec["data"].endswith("kjv_texts") and rec["objective"] == "ce"
    assert rec["heldout_ppl_after"] > 0 and acip.size_ratio(model) <= 0.6
    ref = acip.export(run, 0.6)  # the same export before fine-tuning: same layout, other weights
    assert model.config.acip_layout == ref.config.acip_layout
    assert model.config.acip_export["adapters"] == ref.config.acip_export["adapters"]
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    script = Path(sys.executable).with_name("acip-finetune")
    if script.exists():  # the console script (after pip install -e .)
        help_ = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
        assert help_.returncode == 0 and "--keep" not in help_.stdout and "--ratio" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "acip.finetune", str(run), "ratio=0.6", "steps=0"], env=child_env(),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr


def test_distillation_objective_uses_the_runs_uncompressed_model_as_teacher():
    objectives = pytest.importorskip("acip.train.objectives")
    pm = acip.parametrize(tiny_model("llama"))
    small = acip.export(pm, 0.5, score_map=ScoreMap.from_singular_values(pm))
    windows = torch.randint(0, 96, (8, 16))
    kd = objectives.Distillation(temperature=1.0, kd_weight=1.0)
    rec = finetune(small, windows, 12, lr=5e-3, r=4, objective=kd, teacher=pm, log=None)
    assert math.isfinite(rec["loss_first"]) and rec["loss_first"] > 0  # the export differs from its teacher
    assert rec["loss_last"] < rec["loss_first"]  # and moves towards it
    with pytest.raises(ValueError, match="teacher"):
        finetune(acip.export(pm, 0.5, score_map=ScoreMap.from_singular_values(pm)), windows, 1, objective=kd,
                 log=None)


def test_ratio_sampled_cli_post_tunes_the_runs_adapters_and_records_auto_on_training_validation(tmp_path):
    """mode=ratio_sampled: masks and score map unchanged, adapters trained, decision re-measured and saved."""
    from acip.export.auto import recorded_decisions

    run = tiny_run()
    out = tmp_path / "rs"
    cmd = [sys.executable, "-m", "acip.finetune", str(run), "mode=ratio_sampled", "steps=4", "seq_len=32",
           "ratios=0.4,1.0", "val_windows=2", "eval_seq_len=32", "decide_ratios=0.9,0.5", "seed=3", f"out={out}"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    before, after = acip.load(run), acip.load(out)  # an ACIPModel directory, as acip.load reads it
    assert after.score_map.digest() == before.score_map.digest()
    assert all(torch.equal(m, before.masks()[n]) for n, m in after.masks().items())
    assert any(not torch.equal(a, b) for a, b in zip(after.lora_parameters(), before.lora_parameters()))
    rec = after.score_map.meta["ratio_sampled"]
    from acip.train.schedule import sampled_ratio

    assert rec["drawn"] == [round(sampled_ratio(3, t, 0.4, 1.0), 6) for t in range(4)]
    assert rec["validation"]["split"] == "train" and rec["validation"]["texts"] >= 1
    assert set(recorded_decisions(after.score_map)) == {0.9, 0.5}
    assert set(after.score_map.meta["adapters_auto_val"]["0.9"]) == {"adapters", "no_adapters"}
    small = acip.export(out, 0.9)  # adapters="auto" follows the new decision
    assert small.config.acip_export["adapters"] == recorded_decisions(after.score_map)[0.9]
    for bad, msg in ((["ratio=0.6"], "no meaning"), (["ratios=0.9,0.5"], "lower bound is above"),
                     ([f"out={run}"], "run directory itself")):
        proc = subprocess.run([sys.executable, "-m", "acip.finetune", str(run), "mode=ratio_sampled", *bad],
                              env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
