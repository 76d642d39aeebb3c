"""The compress/export entry points end to end on the tiny model, and their error messages."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import acip
from helpers_train import TINY_ARGS, child_env, run_compress, tiny_run


def test_run_directory_holds_every_artifact_and_results_beat_nothing():
    run = tiny_run()
    for name in ("config.yaml", "acip_config.json", "acip_state.safetensors", "score_map.safetensors", "metrics.csv",
                 "results.json", "plots/ratio_vs_ppl.png", "plots/score_heatmap.png", "plots/kept_ranks.png"):
        assert (run / name).is_file(), name
    assert not (run / "adapters").exists() and not (run / "base_model").exists()
    assert (run / "plots/ratio_vs_ppl.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((run / "results.json").read_text())
    assert res["reached_stop_ratio"] and res["final_size_ratio"] <= 0.5
    assert set(res["ppl"]) == {"acip", "acip_adapters", "acip_no_adapters", "singular_values", "activation_aware"}
    # the trained map without its adapters: the same ranks budget, another model
    assert res["measured_ratio"]["acip_no_adapters"].keys() == res["measured_ratio"]["acip"].keys()
    assert res["ppl"]["acip_no_adapters"] != res["ppl"]["acip_adapters"]
    # adapters="auto": chosen per ratio on the validation split, recorded in the run's score map, and
    # column acip is that choice on every domain
    auto = res["adapters_auto"]
    assert set(auto) == set(res["ppl"]["acip"]) and acip.ScoreMap.load(run / "score_map.safetensors").meta[
        "adapters_auto"] == auto
    for r, on in auto.items():
        v = res["val_ppl"]
        assert on == (v["acip_adapters"][r] < v["acip_no_adapters"][r])
        for dom in res["domains"]:
            cols = res["ppl_by_domain"][dom]
            assert cols["acip"][r] == cols["acip_adapters" if on else "acip_no_adapters"][r]
    assert res["domains"] == ["heldout", "pydoc", "python_source"] and res["primary_domain"] == "heldout"
    assert res["ppl"] == res["ppl_by_domain"]["heldout"] and set(res["reference_ppl"]) == {"val", *res["domains"]}
    assert res["val_ppl_mean"] == pytest.approx(
        math.exp(sum(math.log(res["val_ppl"]["acip"][f"{r:g}"]) for r in res["ratios"] if r < 1)
                 / sum(1 for r in res["ratios"] if r < 1)))
    # the validation split is set aside from the training texts; the held-out split is measured whole
    assert res["eval"]["heldout_texts"] == 200 and 1 <= res["eval"]["val_texts"] <= 150
    assert res["eval"]["tokens"]["val"] == 8 * 64
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
    assert sm.method == "acip" and sm.stop_ratio == 0.5 and sm.source.kind == "path"
    assert sm.meta["global_step"] == res["global_step"] and res["score_map_digests"] == [sm.digest()[:15]]
    pm = acip.load(run)  # the run directory is the parametrized model as trained, with its map
    assert isinstance(pm, acip.ACIPModel) and pm.score_map.digest() == sm.digest()
    assert pm.size_ratio() == pytest.approx(res["final_size_ratio"])


def test_export_cli_in_a_fresh_process_writes_a_loadable_model_at_the_ratio(tmp_path):
    run = tiny_run()
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "acip.export", f"run_dir={run}", "ratio=0.6", f"out={out}"],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "measured target-layer ratio" in proc.stdout
    model = acip.load(out)
    assert acip.size_ratio(model) <= 0.6 and acip.size_ratio(model) > 0.5
    # same model as exporting the run directory in this process (fresh rebuild)
    ref = acip.export(run, ratio=0.6, adapters=model.config.acip_export["adapters"])  # the flag the CLI used
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    # adapters=false: the truncation alone, saved beside it under its own default name
    proc = subprocess.run([sys.executable, "-m", "acip.export", f"run_dir={run}", "ratio=0.6", "adapters=false"],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare = acip.load(run / "export_r60-no-adapters")
    assert bare.config.acip_export["adapters"] is False and acip.size_ratio(bare) <= 0.6
    ref = acip.export(run, ratio=0.6, adapters=False)
    with torch.no_grad():
        assert torch.allclose(bare(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    proc = subprocess.run([sys.executable, "-m", "acip.export", f"run_dir={run}", "ratio=0.6", "adapters=maybe"],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode != 0 and "adapters" in proc.stderr and "maybe" in proc.stderr

def test_redecide_script_recreates_the_runs_own_validation_split(tmp_path):
    """scripts/redecide_adapters.py on a finished run: the same split and so the same decision and
    validation figures as the run's own final evaluation; the run directory is not written."""
    from pathlib import Path

    run = tiny_run()
    state = (run / "acip_state.safetensors").read_bytes()
    script = Path(__file__).resolve().parents[1] / "scripts" / "redecide_adapters.py"
    proc = subprocess.run([sys.executable, str(script), str(run), "--out", str(tmp_path / "new")], env=child_env(),
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "new" / "redecide.json").read_text())
    res = json.loads((run / "results.json").read_text())
    want = {r: v for r, v in res["adapters_auto"].items() if float(r) < 1.0}
    assert rep["after"] == want and rep["val_parts"] is None  # data=kjv: one part, the pooled rule
    assert rep["before"] == res["adapters_auto"]
    for r in want:
        assert rep["val"][r]["adapters"] == pytest.approx(res["val_ppl"]["acip_adapters"][r], rel=1e-5)
        assert rep["val"][r]["no_adapters"] == pytest.approx(res["val_ppl"]["acip_no_adapters"][r], rel=1e-5)
    assert (run / "acip_state.safetensors").read_bytes() == state and not (run / "redecide.json").exists()
    assert acip.ScoreMap.load(tmp_path / "new" / "score_map.safetensors").meta["adapters_auto"] == rep["after"]
    again = subprocess.run([sys.executable, str(script), str(run), "--out", str(tmp_path / "new")], env=child_env(),
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode != 0 and "exists" in again.stderr



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


def written(run) -> set[str]:
    """What a run wrote into its directory, besides Hydra's own .hydra/."""
    return {p.name for p in run.iterdir()} - {".hydra"} if run.is_dir() else set()


@pytest.mark.parametrize("ratio", ["0", "1.0", "1.5", "-0.1"])
def test_stop_ratio_outside_zero_one_is_a_clear_error_and_writes_nothing(monkeypatch, tmp_path, capsys, ratio):
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, tmp_path, f"acip.stop_ratio={ratio}")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "acip.stop_ratio must be in (0, 1)" in err and f"got {ratio};" in err
    assert "e.g. acip.stop_ratio=0.4" in err
    assert written(tmp_path / "run") == set()


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
    assert written(tmp_path / "run") == set()


def test_a_binary_data_file_is_named_and_nothing_is_written(monkeypatch, tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(bytes(range(256)) * 224)  # ~57 KB of bytes that are not text
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, tmp_path, "data=text_files", f"data.paths=[{f}]", base=("experiment=tiny",))
    err = capsys.readouterr().err
    assert f"{str(f)!r} is not UTF-8 text" in err and len(err) < 5000
    assert written(tmp_path / "run") == set()


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
    """acip.whiten_windows > 0: masks over the SVD of W L; the factors are saved in the run directory."""
    run = tmp_path / "run"
    run_compress(run, "acip.whiten_windows=4", "acip.whiten_seq_len=32", "eval.ratios=[0.6]")
    res = json.loads((run / "results.json").read_text())
    # a whitened run's own untrained map is the activation-aware one (not evaluated twice); the
    # plain singular-value baseline comes from a plain parametrization of the untrained weights
    assert set(res["ppl"]) == {"acip", "acip_adapters", "acip_no_adapters", "activation_aware", "singular_values"}
    assert res["ppl"]["activation_aware"] != res["ppl"]["singular_values"]
    pm = acip.load(run)  # rebuilt in this process: base model + saved basis + masks + adapters
    assert pm.acip_config.basis == "activation_aware" and all(l.whitened for l in pm.svd_layers().values())
    small = acip.export(run, ratio=0.6)
    assert acip.size_ratio(small) <= 0.6
    assert acip.size_ratio(small) == pytest.approx(res["measured_ratio"]["acip"]["0.6"])


def test_post_tuning_run_records_the_stop_step_in_the_score_map(tmp_path):
    """Entries pruned at the stop step score <= -1 (the update of that step is not skipped)."""
    run = tmp_path / "run"
    run_compress(run, "acip.post_tune_steps=4", "eval.enabled=false")
    pm = acip.load(run)
    sm, step = pm.score_map, pm.score_map.meta["global_step"]
    stop = sm.meta["updates"]  # one update per acip step, the stop step included
    assert step == stop + 4 and stop < 60
    for name, mask in pm.masks().items():  # masks frozen since the stop step
        assert torch.equal(sm.scores[name] <= -1, mask <= 0), name
        assert torch.equal(sm.scores[name][mask > 0], mask[mask > 0].detach()), name
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[-1].split(",")[:2] == [str(step), "post_tune"]


def test_rerunning_into_an_existing_run_directory_is_refused(monkeypatch, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert "already holds a run (config.yaml)" in err and f"resume={tmp_path / 'run'}" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == "seed: 0\n"


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from acip.cli.compress import unique_run_dir

    a, b = unique_run_dir(tmp_path / "unit" / "12-00-00"), unique_run_dir(tmp_path / "unit" / "12-00-00")
    assert a != b and a.is_dir() and b.is_dir() and b.name == "12-00-00-2"
    # two processes at once through the resolver of the default hydra.run.dir, with a base name that
    # cannot differ between them (the default's is the time to the second); both stop at validation
    same = "hydra.run.dir='${acip_run_dir:${resume},outputs/fixed}'"
    procs = [subprocess.Popen([sys.executable, "-m", "acip.compress", *TINY_ARGS, same, "acip.stop_ratio=2"],
                              env=child_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [1, 1]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["fixed", "fixed-2"]
    assert all((tmp_path / "outputs" / d / ".hydra").is_dir() for d in ("fixed", "fixed-2"))


def test_resume_of_a_missing_directory_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "acip.compress", f"resume={tmp_path / 'nope'}"], env=child_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"acip-compress: resume={tmp_path / 'nope'}: no such directory. Pass the "
                                                f"directory of an earlier run, e.g. resume=outputs/2026-11-30/12-00-00"]
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "acip.compress", f"resume={tmp_path / 'empty'}"], env=child_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and "holds no config.yaml" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_resume_applies_overrides_of_saved_keys_and_refuses_the_rest_by_name(tmp_path):
    from omegaconf import OmegaConf

    from acip.cli.compress import resumed_config

    OmegaConf.save(OmegaConf.create({"acip": {"exclude_modules": None, "max_steps": 60, "lora": {"r": 4}},
                                     "debug": {"step_delay_s": 0.25}, "resume": None}), tmp_path / "config.yaml")
    cfg = resumed_config(tmp_path, ["acip.exclude_modules=[q_proj]", "debug.step_delay_s=0", "acip.max_steps=80",
                                    "hydra.run.dir=x", f"resume={tmp_path}"])
    assert cfg.acip.exclude_modules == ["q_proj"] and cfg.debug.step_delay_s == 0 and cfg.acip.max_steps == 80
    assert cfg.resume == str(tmp_path) and cfg.acip.lora.r == 4
    with pytest.raises(ValueError) as e:
        resumed_config(tmp_path, ["acip=paper", "experiment=tiny", "acip.nope=1", "~debug", "acip.max_steps=70"])
    msg = str(e.value)
    for bad in ("acip=paper: a config group choice", "experiment=tiny: a config group choice",
                "acip.nope=1: no key 'acip.nope'", "~debug: deletions"):
        assert bad in msg, bad
    assert "acip.max_steps=70" not in msg


def test_export_cli_budget_with_ecsq_storage(tmp_path):
    """acip-export --bits-per-param 3 --quantize entropy --quantize-arg fmt=uniform: the budget's quantized
    layers are ECSQ; a quantizer that is not the entropy one, and gptq without calibration, are refused."""
    from acip.cli.export import main
    from acip.quant.module import EntQuantLinear

    run = tiny_run()
    out = main([str(run), "--bits-per-param", "3.0", "--quantize", "entropy", "--quantize-arg", "fmt=uniform",
                "--out", str(tmp_path / "b3")])
    model = acip.load(out)
    info = model.config.acip_export["budget"]
    assert 0.97 * info["budget_bytes"] <= info["stored_bytes"] <= info["budget_bytes"]
    coded = [m for m in model.modules() if isinstance(m, EntQuantLinear)]
    assert model.config.acip_quant["fmt"] == "uniform" and coded and all(m.method == "ecsq" for m in coded)
    with pytest.raises(SystemExit):
        main([str(run), "--bits-per-param", "3.0", "--quantize", "nf4"])
    with pytest.raises(SystemExit):  # rounding=gptq needs --calib-windows
        main([str(run), "--bits-per-param", "3.0", "--quantize", "entropy", "--quantize-arg", "fmt=uniform",
              "--quantize-arg", "rounding=gptq", "--out", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


def test_modernise_keeps_the_value_of_quantize_arg():
    from acip.cli.export import _modernise

    assert _modernise(["run", "--ratio", "0.6", "--quantize", "entropy", "--quantize-arg", "lam=14.5"]) == \
        ["run", "--ratio", "0.6", "--quantize", "entropy", "--quantize-arg", "lam=14.5"]
    assert _modernise(["run_dir=r", "ratio=0.6", "quantize.lam=3.9"]) == ["r", "--ratio=0.6", "--quantize-arg", "lam=3.9"]


def test_export_cli_budget_calibrates_on_the_runs_training_data_without_its_validation_split(tmp_path, capsys):
    from omegaconf import OmegaConf

    from acip.cli.export import _calibration_texts, main
    from acip.train.run import _build, run_validation_split

    run = tiny_run()
    cfg = OmegaConf.load(run / "config.yaml")
    _, tok = _build(cfg.model)
    texts, what = _calibration_texts(run, "run", tok)
    train, _ = _build(cfg.data)
    rest, val = run_validation_split(cfg, train, tok)
    assert "run's training data" in what and sorted(texts) == sorted(rest) and not set(val) & set(texts)
    kjv, what = _calibration_texts(run, "kjv", tok)
    assert what == "the KJV training split" and sorted(kjv) == sorted(acip.data.kjv_split()[0])
    out = main([str(run), "--bits-per-param", "3.0", "--calib-windows", "2", "--quantize", "entropy",
                "--quantize-arg", "fmt=uniform", "--quantize-arg", "rounding=gptq", "--out", str(tmp_path / "g")])
    assert "2 windows of 128 tokens of the run's training data" in capsys.readouterr().out
    model = acip.load(out)
    assert model.config.acip_quant["rounding"] == "gptq" and model.config.acip_export["budget"]["calibrated"]
