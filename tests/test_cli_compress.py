"""The compress/export entry points end to end on the tiny model, and their error messages."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import acip
from acip.train.testing import TINY_ARGS, child_env, tiny_run


def test_run_directory_holds_every_artifact_and_results_beat_nothing():
    run = tiny_run()
    for name in ("config.yaml", "score_map.safetensors", "metrics.csv", "results.json",
                 "adapters/acip_adapters.safetensors", "plots/ratio_vs_ppl.png", "plots/score_heatmap.png",
                 "plots/kept_ranks.png"):
        assert (run / name).is_file(), name
    assert (run / "plots/ratio_vs_ppl.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((run / "results.json").read_text())
    assert res["reached_stop_ratio"] and res["final_size_ratio"] <= 0.5
    assert set(res["ppl"]) == {"acip", "acip_no_adapters", "singular_values", "activation_aware"}
    # the trained map without its adapters: the same ranks budget, another model
    assert res["measured_ratio"]["acip_no_adapters"].keys() == res["measured_ratio"]["acip"].keys()
    assert res["ppl"]["acip_no_adapters"] != res["ppl"]["acip"]
    if "1" in res["ppl"]["acip"]:  # at full size both baselines are the untouched model
        assert res["ppl"]["activation_aware"]["1"] == pytest.approx(res["ppl"]["singular_values"]["1"], rel=1e-4)
    # the whitened basis orders directions differently: not a copy of the singular-value column
    assert res["ppl"]["activation_aware"] != res["ppl"]["singular_values"]
    for method, by_ratio in res["measured_ratio"].items():
        assert list(by_ratio) == [f"{r:g}" for r in res["ratios"]]
        for r, measured in by_ratio.items():  # measured from the exported tensors, never above target
            assert measured <= float(r) + 1e-9 and measured > float(r) - 0.1
        assert all(math.isfinite(v) for v in res["ppl"][method].values())
    sm = acip.ScoreMap.load(run / "score_map.safetensors")
    assert sm.method == "acip" and sm.stop_ratio == 0.5 and sm.meta["adapters"] == "adapters"
    assert sm.meta["global_step"] == res["global_step"] and sm.source["kind"] == "path"


def test_export_cli_in_a_fresh_process_writes_a_loadable_model_at_the_ratio(tmp_path):
    run = tiny_run()
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "acip.export", f"run_dir={run}", "ratio=0.6", f"out={out}"],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "measured target-layer ratio" in proc.stdout
    model = acip.load(out)
    assert acip.size_ratio(model) <= 0.6 and acip.size_ratio(model) > 0.5
    # same model as exporting from the score map in memory of this process (fresh rebuild)
    ref = acip.export(acip.ScoreMap.load(run / "score_map.safetensors"), ratio=0.6)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    # adapters=false: the truncation alone, saved beside it under its own default name
    proc = subprocess.run([sys.executable, "-m", "acip.export", f"run_dir={run}", "ratio=0.6", "adapters=false"],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare = acip.load(run / "export_r60-no-adapters")
    assert bare.config.acip_export["adapters"] is False and acip.size_ratio(bare) <= 0.6
    ref = acip.export(acip.ScoreMap.load(run / "score_map.safetensors"), ratio=0.6, adapters=False)
    with torch.no_grad():
        assert torch.allclose(bare(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    proc = subprocess.run([sys.executable, "-m", "acip.export", f"run_dir={run}", "ratio=0.6", "adapters=maybe"],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode != 0 and "adapters='maybe'" in proc.stderr and "adapters=false" in proc.stderr


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_cfg_job_prints_the_resolved_config_from_any_directory(tmp_path, entry):
    from pathlib import Path

    script = Path(sys.executable).with_name("acip-compress")
    exe = [sys.executable, "-m", "acip.compress"] if entry == "module" else [str(script)]
    proc = subprocess.run([*exe, *TINY_ARGS, "acip.stop_ratio=0.3", "--cfg", "job"],
                          env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stop_ratio: 0.3" in proc.stdout and "acip.train.models.tiny_llama" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def run_cli(monkeypatch, tmp_path, *args: str, base: tuple[str, ...] = TINY_ARGS) -> None:
    """Run ``acip.cli.compress.main`` in this process (Hydra exits non-zero on an error)."""
    from acip.cli import compress

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["acip-compress", *base, f"hydra.run.dir={tmp_path / 'run'}", *args])
    compress.main()


@pytest.mark.parametrize("ratio", ["0", "1.0", "1.5", "-0.1"])
def test_stop_ratio_outside_zero_one_is_a_clear_error(monkeypatch, tmp_path, capsys, ratio):
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, tmp_path, f"acip.stop_ratio={ratio}")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"acip.stop_ratio={float(ratio)!r}" in err or f"acip.stop_ratio={ratio}" in err
    assert "outside (0, 1)" in err and "e.g. acip.stop_ratio=0.4" in err


def test_hub_id_without_network_says_how_to_pass_a_local_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, tmp_path, "model=hf", "model.path=some-org/not-a-cached-model")
    err = capsys.readouterr().err
    assert "some-org/not-a-cached-model" in err and "local directory" in err


def test_dataset_shorter_than_one_batch_is_a_clear_error(monkeypatch, tmp_path, capsys):
    f = tmp_path / "small.txt"
    f.write_text("In the beginning.\n\nAnd the earth was without form.\n\nAnd void.")
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, tmp_path, "data=text_files", f"data.paths=[{f}]", base=("experiment=tiny",))
    err = capsys.readouterr().err
    assert "fewer than one batch" in err and "batch_size=4" in err and "lower acip.seq_len" in err


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_score_map(monkeypatch, tmp_path, capsys):
    from acip.train.module import ACIPModule

    real = ACIPModule.task_loss

    def poisoned(self, input_ids):
        loss = real(self, input_ids)
        return loss * float("nan") if self.trainer.global_step >= 3 else loss

    monkeypatch.setattr(ACIPModule, "task_loss", poisoned)
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, tmp_path, "acip.checkpoint_every=2", "eval.enabled=false")
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "last good step" in err
    sm = acip.ScoreMap.load(tmp_path / "run" / "score_map.safetensors")
    assert sm.meta["global_step"] == 3 and sm.meta["updates"] == 3
    assert all(torch.isfinite(s).all() for s in sm.scores.values())


def test_training_in_the_activation_aware_basis(tmp_path):
    """acip.whiten_windows > 0: masks over the SVD of W L; the factors travel with the score map."""
    from acip.train.testing import run_compress

    run = tmp_path / "run"
    run_compress(run, "acip.whiten_windows=4", "acip.whiten_seq_len=32", "eval.ratios=[0.6]")
    assert (run / "score_map.whitening.safetensors").is_file()
    res = json.loads((run / "results.json").read_text())
    # a whitened run's own untrained map is the activation-aware one (not evaluated twice); the
    # plain singular-value baseline comes from a plain parametrization of the untrained weights
    assert set(res["ppl"]) == {"acip", "acip_no_adapters", "activation_aware", "singular_values"}
    assert res["ppl"]["activation_aware"] != res["ppl"]["singular_values"]
    sm = acip.ScoreMap.load(run / "score_map.safetensors")
    assert sm.meta["whitening"] == "score_map.whitening.safetensors"
    small = acip.export(sm, ratio=0.6)  # rebuilt in this process: base model + factors + adapters
    assert acip.size_ratio(small) <= 0.6
    assert sm.model is not None and all(l.whitened for l in sm.model.svd_layers().values())
