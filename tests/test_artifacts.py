"""Saved artifacts: a parametrized model reloads exactly from its own description, every tensor acip
writes is verified when read, and nothing wrong loads silently (issue: seams)."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import acip
from acip.core import ACIPConfig, ArtifactError, BasisMismatchError, ChecksumError, ScoreMap, ScoreMapError
from acip.core.io import atomic_dir, read_tensors, save_tensors
from acip.core.whiten import calibrate_whitening


def _flip(path: Path, tensor: str, n: int = 64) -> None:
    """Overwrite ``n`` bytes in the middle of ``tensor``'s data inside a safetensors file."""
    data = bytearray(path.read_bytes())
    hlen = int.from_bytes(data[:8], "little")
    info = json.loads(data[8:8 + hlen])[tensor]
    b, e = info["data_offsets"]
    start = 8 + hlen + b + max(0, (e - b) // 2 - n // 2)
    for i in range(start, min(start + n, 8 + hlen + e)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _trained_like(pm):
    """Give masks and adapters the state a run leaves: some directions pruned, adapters non-zero."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.mask.copy_(torch.randn(l.mask.shape, generator=g) * 0.02)
            if l.lora_B is not None:
                l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=g) * 0.02)
    pm.score_map = ScoreMap.from_masks(pm)
    return pm


@pytest.fixture
def base_dir(tmp_path):
    d = tmp_path / "base"
    tiny_model("llama").save_pretrained(d)
    return d


def _whitened_run(base_dir, lora=True):
    model, _ = acip.load_base(str(base_dir))
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(5))
    factors = calibrate_whitening(model, calib.split(2))
    pm = acip.parametrize(model, lora={"r": 2, "lora_alpha": 4} if lora else None, svd_dtype=torch.float32,
                          whitening=factors)
    return _trained_like(pm)


def test_whitened_run_reloads_in_its_own_basis_in_a_fresh_process(base_dir, tmp_path, tokens):
    """The bug of the old adapters/ directory: a run in the activation-aware basis, saved and loaded in
    a new process, pruned or exported at 0.9, equals the in-process result."""
    pm = _whitened_run(base_dir)
    assert pm.acip_config.basis == "activation_aware"
    run = tmp_path / "run"
    pm.save_pretrained(run)
    with torch.no_grad():
        expect_export = acip.export(pm, 0.9)(input_ids=tokens).logits
        pm.prune(0.9)
        expect_pruned = pm(input_ids=tokens).logits
        pm.unprune()
    code = (
        "import acip, torch, sys\n"
        "t = torch.load(sys.argv[2])\n"
        "pm = acip.load(sys.argv[1]); pm.prune(0.9)\n"
        "with torch.no_grad():\n"
        "    a = pm(input_ids=t).logits; b = acip.load(sys.argv[1], ratio=0.9)(input_ids=t).logits\n"
        "torch.save((a, b, pm.acip_config.basis), sys.argv[3])\n"
    )
    torch.save(tokens, tmp_path / "tok.pt")
    subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "tok.pt"), str(tmp_path / "out.pt")],
                   check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    pruned, exported, basis = torch.load(tmp_path / "out.pt")
    assert basis == "activation_aware"
    assert (pruned - expect_pruned).abs().max() <= 1e-5
    assert (exported - expect_export).abs().max() <= 1e-5
    _flip(run / "acip_basis.safetensors", f"{pm.acip_config.layers[0]}.whitening", n=8)
    with pytest.raises(ChecksumError, match="whitening"):
        acip.load(run)


def test_save_factors_and_basis_check(base_dir, tmp_path, tokens):
    """Without saved factors the re-computed SVD is checked against the saved fingerprint; another base
    model of the same shapes is refused. With save_factors=True no SVD runs and the result is exact."""
    model, _ = acip.load_base(str(base_dir))
    pm = _trained_like(acip.parametrize(model, lora={"r": 2}))
    pm.save_pretrained(tmp_path / "plain")
    pm.save_pretrained(tmp_path / "factors", save_factors=True)
    other = tiny_model("llama", seed=7)
    with pytest.raises(BasisMismatchError, match="differs from the trained one"):
        acip.load(tmp_path / "plain", model=copy.deepcopy(other))
    with pytest.raises(ValueError, match="another base model"):
        acip.load(tmp_path / "factors", model=copy.deepcopy(other))
    again = acip.load(tmp_path / "factors")
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens).logits, pm(input_ids=tokens).logits)
    assert again.score_map.digest() == pm.score_map.digest()


@pytest.mark.parametrize("what", ["embedding", "norm", "lowrank_factor"])
def test_corrupted_export_tensor_is_refused_naming_it(what, tiny_llama, tmp_path):
    pm = acip.parametrize(tiny_llama)
    small = acip.export(pm, 0.5, score_map=ScoreMap.from_singular_values(pm))
    small.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    names = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
    tensor = {"embedding": "model.embed_tokens.weight", "norm": "model.norm.weight",
              "lowrank_factor": next(n for n in names if n.endswith(".up.weight"))}[what]
    _flip(f, tensor, n=16)
    with pytest.raises(ChecksumError, match=tensor.replace(".", r"\.")) as e:
        acip.load(tmp_path)
    assert e.value.tensor == tensor and e.value.file.endswith("model.safetensors")


@pytest.mark.parametrize("what", ["coded_stream", "scales", "embedding"])
def test_corrupted_quantized_checkpoint_is_refused_naming_it(what, tiny_llama, tmp_path):
    """The issue's case: 64 bytes overwritten in the fp32 embedding of an entropy-quantized
    checkpoint loaded and ran. Now every stored tensor is under the manifest."""
    from acip.quant import EntropyQuantConfig

    pm = acip.parametrize(tiny_llama)
    q = acip.export(pm, 0.8, score_map=ScoreMap.from_singular_values(pm),
                    quantize=EntropyQuantConfig(lam=14.5, max_iter=10))
    q.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    names = list(json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")]))
    pick = {"embedding": lambda n: n == "model.embed_tokens.weight",
            "coded_stream": lambda n: "stream" in n or "payload" in n,
            "scales": lambda n: "scale" in n}[what]
    tensor = next(n for n in names if pick(n))
    _flip(f, tensor, n=4)
    with pytest.raises(ChecksumError) as e:
        acip.load(tmp_path)
    assert e.value.tensor == tensor and tensor in str(e.value)


def test_corrupted_score_map_and_state_are_refused(tiny_llama, tmp_path):
    pm = _trained_like(acip.parametrize(tiny_llama, lora={"r": 2}))
    pm.save_pretrained(tmp_path)
    layer = pm.acip_config.layers[0]
    _flip(tmp_path / "score_map.safetensors", layer, n=4)
    with pytest.raises(ScoreMapError, match=layer.replace(".", r"\.")):
        ScoreMap.load(tmp_path)
    for tensor in (f"{layer}.lora_A", f"{layer}.mask", f"score.{layer}"):
        pm.save_pretrained(tmp_path)
        _flip(tmp_path / "acip_state.safetensors", tensor, n=4)
        with pytest.raises(ChecksumError, match=tensor.replace(".", r"\.")):
            acip.load(tmp_path, model=copy.deepcopy(tiny_llama))


def test_edited_header_fields_are_refused(tiny_llama, tmp_path):
    """Bias flags, shapes or the config in a header are covered by the header's own sha256."""
    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    path = sm.save(tmp_path / "sm.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode()
    edited = header.replace("false]", "true ]", 1)  # one bias flag flipped, same header length
    assert edited != header and len(edited) == len(header)
    path.write_bytes(raw[:8] + edited.encode() + raw[8 + n:])
    with pytest.raises(ScoreMapError, match="header metadata was edited"):
        ScoreMap.load(path)


def test_score_map_load_reads_the_file_once(tiny_llama, tmp_path, monkeypatch):
    pm = acip.parametrize(tiny_llama)
    path = ScoreMap.from_singular_values(pm).save(tmp_path / "sm.safetensors")
    calls = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: calls.append(self) or real(self))
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("a second read"))
    sm = ScoreMap.load(path)
    assert calls == [path] and sm.config == pm.acip_config


def test_malformed_score_map_headers_raise_score_map_error(tiny_llama, tmp_path):
    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    for field, value in [("layers", "[[1, 2]]"), ("stop_ratio", '"abc"'), ("config", '{"basis": 3}'), ("meta", "[]")]:
        header = {"format": "acip.score_map/2", "acip_version": "x", "method": "m", "stop_ratio": "null",
                  "config": json.dumps(sm.config.to_dict()), "meta": "{}",
                  "layers": json.dumps([[n, list(sm.shapes[n]), sm.biases[n]] for n in sm.scores])}
        header[field] = value
        save_tensors(tmp_path / "bad.safetensors", sm.scores, header)
        with pytest.raises(ScoreMapError, match="bad.safetensors"):
            ScoreMap.load(tmp_path / "bad.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(sm.save(tmp_path / "ok.safetensors").read_bytes()[:100])
    with pytest.raises(ScoreMapError, match="truncated"):
        ScoreMap.load(tmp_path / "cut.safetensors")


def test_export_never_changes_a_plain_model_passed_in(tiny_llama, tokens):
    ref = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    pm = acip.parametrize(copy.deepcopy(tiny_llama))
    sm = ScoreMap.from_singular_values(pm)
    small = acip.export(sm, 0.5, model=tiny_llama)
    assert acip.size_ratio(small) <= 0.5
    assert all(type(m) is torch.nn.Linear for n, m in tiny_llama.named_modules() if n.endswith("q_proj"))
    assert all(torch.equal(ref[k], v) for k, v in tiny_llama.state_dict().items())


def test_a_map_is_refused_on_a_model_with_layers_it_does_not_name():
    """A 2-layer map on a 3-layer model of the same widths: the extra layers are named."""
    import transformers as tf
    from conftest import TINY

    two = tiny_model("llama")
    pm = acip.parametrize(copy.deepcopy(two))
    sm = ScoreMap.from_singular_values(pm)
    three = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**TINY, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"model\.layers\.2\."):
        acip.export(sm, 0.5, model=three)
    handmade = ScoreMap(sm.scores, sm.shapes, sm.biases, method="x")  # no config: checked by names
    with pytest.raises(ScoreMapError, match=r"model\.layers\.2\..*in the model but not in the score map"):
        acip.export(handmade, 0.5, model=three)


def test_a_lora_map_without_its_adapters_is_refused(tiny_llama):
    pm = acip.parametrize(copy.deepcopy(tiny_llama), lora={"r": 2})
    sm = ScoreMap.from_singular_values(pm)
    with pytest.raises(ScoreMapError, match="trained LoRA adapters"):
        acip.export(sm, 0.5, model=tiny_llama)
    assert acip.size_ratio(acip.export(sm, 0.5, model=tiny_llama, adapters=False)) <= 0.5


def test_edited_or_incomplete_export_directories_are_refused(tiny_llama, tmp_path):
    pm = acip.parametrize(tiny_llama)
    small = acip.export(pm, 0.5, score_map=ScoreMap.from_singular_values(pm))
    small.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    name = next(n for n, e in cfg["acip_layout"].items() if e["kind"] == "lowrank")
    for edit in ("remove", "rename", "rank"):
        c = json.loads(original)
        e = c["acip_layout"].pop(name)
        if edit == "rename":
            c["acip_layout"][name.replace("layers.0", "layers.9")] = e
        elif edit == "rank":
            c["acip_layout"][name] = {**e, "rank": e["rank"] + 1}
        cfg_path.write_text(json.dumps(c))
        with pytest.raises(ChecksumError, match="acip_layout was edited"):
            acip.load(tmp_path)
        with pytest.raises(ArtifactError, match="does not match its acip_layout"):
            acip.load(tmp_path, verify=False)  # no manifest check: the load report itself is checked
    cfg_path.write_text(original)
    assert acip.load(tmp_path) is not None
    (tmp_path / "acip_manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no acip_manifest.json"):
        acip.load(tmp_path)


def test_a_failed_save_leaves_the_previous_export_intact(tiny_llama, tmp_path, tokens, monkeypatch):
    """Like a SIGKILL mid-save: the new export never mixes with the old one, the old stays loadable."""
    import acip.core.io as io

    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    old = acip.export(pm, 0.8, score_map=sm)
    old.save_pretrained(tmp_path / "out")
    new = acip.export(pm, 0.4, score_map=sm)
    monkeypatch.setattr(io, "file_digests", lambda p: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path / "out")
    monkeypatch.undo()
    again = acip.load(tmp_path / "out")
    assert again.config.acip_export["ratio"] == 0.8
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left
    new.save_pretrained(tmp_path / "out")
    assert acip.load(tmp_path / "out").config.acip_export["ratio"] == 0.4


def test_atomic_dir_cleans_leftovers_of_a_killed_writer(tmp_path):
    stale = tmp_path / ".out.abc.tmp"
    stale.mkdir()
    os.utime(stale, (0, 0))
    with atomic_dir(tmp_path / "out") as d:
        (d / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_state_file_needs_digests_and_config_copy_must_match(tiny_llama, tmp_path):
    pm = acip.parametrize(copy.deepcopy(tiny_llama))
    pm.save_pretrained(tmp_path)
    side = json.loads((tmp_path / "acip_config.json").read_text())
    side["config"]["mask_scaling"] = 0.5
    (tmp_path / "acip_config.json").write_text(json.dumps(side))
    with pytest.raises(ArtifactError, match="does not match the config saved"):
        acip.load(tmp_path, model=copy.deepcopy(tiny_llama))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ArtifactError, match="carries no tensor digests"):
        read_tensors(tmp_path / "plain.safetensors")


def test_previous_format_run_directory_fails_with_the_conversion_command_and_converts(base_dir, tmp_path, tokens):
    """A run directory of the previous format (adapters/, a v1 score map, a whitening side file) is
    refused with the command that converts it; after `python -m acip.convert` it loads in its basis."""
    from safetensors.torch import save_file

    pm = _whitened_run(base_dir)
    run = tmp_path / "old"
    (run / "adapters").mkdir(parents=True)
    cfg = pm.acip_config
    settings = {"target_modules": cfg.target_modules, "exclude_modules": None, "mask_scaling": cfg.mask_scaling,
                "lora": {"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0}, "svd_dtype": cfg.svd_dtype,
                "layers": list(cfg.layers)}
    source = {"model": str(base_dir.resolve()), "kind": "path", "dtype": "float32"}
    (run / "adapters" / "acip_config.json").write_text(json.dumps({"settings": settings, "source": source}))
    save_file(pm.adapter_state(), str(run / "adapters" / "acip_adapters.safetensors"))
    save_file({n: t.contiguous() for n, t in pm.basis.items()}, str(run / "score_map.whitening.safetensors"))
    sm = pm.score_map
    header = {"format": "acip.score_map/1", "acip_version": "0.1.0", "method": "acip", "stop_ratio": "0.5",
              "source": json.dumps(source), "layers": json.dumps([[n, list(sm.shapes[n]), sm.biases[n]] for n in sm.scores]),
              "meta": json.dumps({"parametrize": settings, "adapters": "adapters",
                                  "whitening": "score_map.whitening.safetensors"})}
    save_file({n: s.contiguous() for n, s in sm.scores.items()}, str(run / "score_map.safetensors"), metadata=header)
    with pytest.raises(ArtifactError, match=r"python -m acip\.convert"):
        acip.load(run)
    with pytest.warns(UserWarning, match="previous format"):
        assert ScoreMap.load(run).config.basis == "activation_aware"
    subprocess.run([sys.executable, "-m", "acip.convert", str(run)], check=True,
                   env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True)
    again = acip.load(run)
    with torch.no_grad():
        assert (again(input_ids=tokens).logits - pm(input_ids=tokens).logits).abs().max() <= 1e-5
    assert again.score_map.digest() == sm.digest()


def test_acip_config_validates_and_round_trips():
    from acip.core.config import ConfigError

    cfg = ACIPConfig(target_modules=["q_proj"], lora={"r": 4}, svd_dtype="float32")
    assert ACIPConfig.from_dict(json.loads(cfg.to_json())) == cfg and cfg.lora.lora_alpha == 4.0
    for bad, match in [({"mask_scaling": 0}, "mask_scaling"), ({"lora": {"r": 0}}, "lora.r"),
                       ({"svd_dtype": "int8"}, "svd_dtype"), ({"basis": "whitened"}, "basis"),
                       ({"target_modules": 3}, "target_modules"), ({"mask_scaling": True}, "mask_scaling")]:
        with pytest.raises(ConfigError, match=match):
            ACIPConfig(**bad)
    with pytest.raises(ConfigError, match=r"unknown keys \['targets'\]"):
        ACIPConfig.from_dict({"targets": "all-linear"})
    with pytest.raises(TypeError, match="unknown arguments"):
        acip.parametrize(tiny_model("llama"), rank=3)


def test_truncated_export_is_a_clear_error_with_or_without_verification(tiny_llama, tmp_path):
    pm = acip.parametrize(tiny_llama)
    acip.export(pm, 0.5, score_map=ScoreMap.from_singular_values(pm)).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        acip.load(tmp_path)
    with pytest.raises(ArtifactError, match="model.safetensors|weights do not load"):
        acip.load(tmp_path, verify=False)


def test_export_cli_help_and_bad_ratio_name_the_argument(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "acip.export", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--ratio" in out.stdout and "--quantize" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "acip.export", str(tmp_path), "ratio=abc"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "--ratio" in bad.stderr and "'abc'" in bad.stderr and "Traceback" not in bad.stderr
