"""Whole-model behaviour: quantize_, report, save/load, decode modes, corrupted files, NF4, export."""
from __future__ import annotations

import copy
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "disabled")

import acip  # noqa: E402
from acip import quant  # noqa: E402
from acip.core.io import ArtifactError  # noqa: E402
from acip.quant import ChecksumError, EntQuantLinear, EntropyQuantConfig  # noqa: E402


def _tiny(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = _tiny()
    ref = _logits(base)
    model = quant.quantize_(copy.deepcopy(base), EntropyQuantConfig(lam=3.9))
    out = _logits(model)
    d = tmp_path_factory.mktemp("q") / "tiny"
    model.save_pretrained(d)
    return {"base": base, "ref": ref, "model": model, "out": out, "dir": d}


def test_quantize_targets_every_linear_but_the_head(saved: dict) -> None:
    model = saved["model"]
    q = quant.quantized_layers(model)
    assert len(q) == 14 and isinstance(model.lm_head, nn.Linear)
    assert set(model.config.acip_layout) == set(q)
    assert all(e["kind"] == "entquant" for e in model.config.acip_layout.values())


def test_quantized_outputs_stay_close(saved: dict) -> None:
    assert _rel(saved["out"], saved["ref"]) < 0.12


def test_report_bits_count_every_byte_and_track_entropy(saved: dict) -> None:
    rep = quant.report(saved["model"])
    t = rep.total
    assert len(rep.rows) == 14 and t["params"] == sum(r.params for r in rep.rows)
    for r in rep.rows:
        assert r.bits == pytest.approx(8 * (r.stream_bytes + r.table_bytes + r.scale_bytes) / r.params)
        side = 8 * (r.table_bytes + r.scale_bytes) / r.params
        assert r.bits <= 1.01 * (r.entropy + side) + 64 / r.params  # + ANS flush of a few bytes
    assert t["bits"] <= 1.01 * (t["entropy"] + 8 * (t["table_bytes"] + t["scale_bytes"]) / t["params"])
    text = str(rep)
    assert "model.layers.1.mlp.down_proj" in text and "total" in text


def _safetensors_data_bytes(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    return len(raw) - 8 - n, header


def test_file_size_follows_reported_bytes(saved: dict) -> None:
    data, _ = _safetensors_data_bytes(saved["dir"] / "model.safetensors")
    assert data == quant.report(saved["model"]).total["model_bytes"]


def test_save_load_logits_match_exactly(saved: dict) -> None:
    again = acip.load(saved["dir"])
    assert isinstance(again.model.layers[0].mlp.up_proj, EntQuantLinear)
    assert torch.equal(_logits(again), saved["out"])
    assert quant.report(again).total == quant.report(saved["model"]).total


def test_lazy_mode_keeps_streams_coded_and_matches(saved: dict) -> None:
    again = acip.load(saved["dir"])
    quant.set_decode_mode(again, "lazy", cache_layers=2)
    layers = quant.quantized_layers(again).values()
    assert all(m._weight is None for m in layers)
    assert torch.equal(_logits(again), saved["out"])
    cache = next(iter(layers)).cache
    # each miss decodes the layer and the next one in a single lockstep pass
    assert len(cache) == 2 and cache.decodes == 14 and cache.passes == 7
    quant.set_decode_mode(again, "lazy", cache_layers=0)  # no cache: one pass per layer use
    assert torch.equal(_logits(again), saved["out"])
    cache0 = next(iter(layers)).cache
    assert len(cache0) == 0 and cache0.decodes == 14 and cache0.passes == 14
    with pytest.raises(ValueError, match="cache_layers must be an int >= 0"):
        quant.set_decode_mode(again, "lazy", cache_layers=-1)
    quant.set_decode_mode(again, "eager")
    assert all(m._weight is not None for m in layers)
    with pytest.raises(ValueError, match="'eager' or 'lazy'"):
        quant.set_decode_mode(again, "sometimes")


@pytest.mark.parametrize("part", ["codes_stream", "scales"])
def test_corrupted_file_raises_checksum_error_naming_layer(saved: dict, tmp_path: Path, part: str) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    for f in saved["dir"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    path = d / "model.safetensors"
    _, header = _safetensors_data_bytes(path)
    name = f"model.layers.1.self_attn.v_proj.{part}"
    lo, hi = header[name]["data_offsets"]
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start + (lo + hi) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=rf"model.safetensors.*{name}") as err:  # the manifest, on load
        acip.load(d)
    assert err.value.tensor == name and err.value.file == str(path)
    broken = acip.load(d, verify=False)  # past the manifest, the layer's own sha256 still refuses it
    with pytest.raises(ChecksumError, match="model.layers.1.self_attn.v_proj") as err:
        _logits(broken)
    assert err.value.tensor == ("model.layers.1.self_attn.v_proj" if part == "codes_stream" else name)


def test_missing_weights_file_is_a_clear_error(saved: dict, tmp_path: Path) -> None:
    d = tmp_path / "nofile"
    d.mkdir()
    (d / "config.json").write_bytes((saved["dir"] / "config.json").read_bytes())
    with pytest.raises(ArtifactError, match="has no acip_manifest.json"):
        acip.load(d)
    (d / "acip_manifest.json").write_bytes((saved["dir"] / "acip_manifest.json").read_bytes())
    with pytest.raises(ArtifactError, match=r"model.safetensors' is listed in the manifest but missing"):
        acip.load(d)
    with pytest.raises(ArtifactError, match="holds no weight files"):
        acip.load(d, verify=False)


def test_quantizes_each_factor_of_lowrank_layers(tmp_path: Path) -> None:
    base = _tiny(seed=2)
    ref = _logits(base)
    pm = acip.parametrize(base)
    small = acip.export(pm, ratio=0.9, score_map=acip.ScoreMap.from_singular_values(pm),
                        quantize=EntropyQuantConfig(lam=3.9))
    names = set(quant.quantized_layers(small))
    assert any(n.endswith(".down") for n in names) and any(n.endswith(".up") for n in names)
    out = _logits(small)
    assert _rel(out, ref) < 0.35
    small.save_pretrained(tmp_path / "lr")
    assert torch.equal(_logits(acip.load(tmp_path / "lr")), out)


def test_outlier_layer_is_listed_as_fallback() -> None:
    model = _tiny(seed=3)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5, 7] = 1e4
    quant.quantize_(model, {"lam": 14.5, "target_modules": ["mlp.up_proj", "mlp.down_proj"]})
    rep = quant.report(model)
    assert rep.fallbacks == ["model.layers.0.mlp.up_proj"]
    assert "fallback to absmax8" in str(rep) and "dynamic range" in str(rep)
    assert len(rep.rows) == 4


def test_quantize_accepts_strings_and_dicts() -> None:
    m = quant.quantize_(_tiny(), {"lam": 14.5, "target_modules": ["q_proj"]})
    assert len(quant.quantized_layers(m)) == 2
    with pytest.raises(ValueError, match=r"unknown quantizer 'fp4'.*EntropyQuantConfig.*'nf4'"):
        quant.quantize_(_tiny(), "fp4")


def test_nf4_hand_off_or_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [bench] extra")
    m = quant.quantize_(_tiny(), "nf4")
    rep = quant.report(m)
    assert len(rep.rows) == 14 and all(r.method == "nf4" for r in rep.rows)
    assert all(r.stream_bytes * 2 == r.params for r in rep.rows)  # packed 4-bit codes
    assert 4.0 < rep.total["bits"] < 6.5  # + absmax and code books (~4.14 bits on 576 x 1536)
    assert _rel(_logits(m), _logits(_tiny())) < 0.2
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"bitsandbytes.*pip install"):
        quant.quantize_(_tiny(), "nf4")


def _flip_byte(path: Path, tensor: str) -> None:
    """Flip one byte in the middle of ``tensor``'s data inside a safetensors file."""
    _, header = _safetensors_data_bytes(path)
    lo, hi = header[tensor]["data_offsets"]
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start + (lo + hi) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_nf4_save_and_reload_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [bench] extra")
    from acip.quant.nf4 import NF4Linear

    m = quant.quantize_(_tiny(), "nf4")
    out = _logits(m)
    assert m.config.acip_layout["model.layers.0.mlp.up_proj"]["kind"] == "nf4"
    m.save_pretrained(tmp_path / "nf4")
    data, header = _safetensors_data_bytes(tmp_path / "nf4" / "model.safetensors")
    assert data == quant.report(m).total["model_bytes"]  # the file holds exactly the counted bytes
    assert "model.layers.0.mlp.up_proj.qweight" in header
    again = acip.load(tmp_path / "nf4")
    layers = [mod for mod in again.modules() if isinstance(mod, NF4Linear)]
    assert len(layers) == 14
    assert torch.equal(_logits(again), out)  # same bytes, same bitsandbytes kernel
    assert quant.report(again).total["bits"] == quant.report(m).total["bits"]
    # loading in bf16 must not round the float quant state (stored as int32 bits)
    half = acip.load(tmp_path / "nf4", dtype=torch.bfloat16)
    a, b = m.model.layers[1].self_attn.o_proj, half.model.layers[1].self_attn.o_proj
    sa, sb = a.stored_tensors(), b.stored_tensors()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _rel(_logits(half).float(), out) < 0.05
    # a corrupted byte is a checksum error naming the layer
    _flip_byte(tmp_path / "nf4" / "model.safetensors", "model.layers.1.mlp.gate_proj.qweight")
    with pytest.raises(ChecksumError, match="model.layers.1.mlp.gate_proj.qweight"):
        acip.load(tmp_path / "nf4")
    with pytest.raises(ChecksumError, match="model.layers.1.mlp.gate_proj.qweight") as err:
        _logits(acip.load(tmp_path / "nf4", verify=False))  # the layer's own per-tensor digest
    assert err.value.tensor == "model.layers.1.mlp.gate_proj.qweight"


def test_nf4_export_of_lowrank_factors_reloads(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [bench] extra")
    from acip.quant.nf4 import NF4Linear

    base = _tiny(seed=4)
    pm = acip.parametrize(base)
    small = acip.export(pm, ratio=0.9, score_map=acip.ScoreMap.from_singular_values(pm), quantize="nf4")
    names = [n for n, mod in small.named_modules() if isinstance(mod, NF4Linear)]
    assert any(n.endswith(".down") for n in names)  # factors with in_features % 64 == 0
    out = _logits(small)
    small.save_pretrained(tmp_path / "lr_nf4")
    again = acip.load(tmp_path / "lr_nf4")
    assert sorted(n for n, mod in again.named_modules() if isinstance(mod, NF4Linear)) == sorted(names)
    assert torch.equal(_logits(again), out)
