"""Lossless mode (``LosslessConfig`` / ``"lossless"``): bit-exact weights, stored bytes, checksums, export."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import acip
from acip import quant
from acip.core import LowRankLinear
from acip.core.io import ChecksumError
from acip.quant import LosslessConfig, LosslessLinear
from acip.quant.lossless import join_float, split_float
from conftest import tiny_model

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to ``dtype``, buffers (rotary tables) left in fp32, as ``from_pretrained(dtype=...)`` builds them."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(INT_VIEW[t.dtype])


def _lossless(model: nn.Module) -> dict[str, LosslessLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LosslessLinear)}


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8: 8 + n]), 8 + n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_bit_pattern_survives_split_and_join(dtype: torch.dtype) -> None:
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)  # NaNs, infs, -0, subnormals
    exp, raw = split_float(every)
    assert exp.dtype == torch.uint8 and raw.dtype == torch.uint8
    assert raw.numel() == (every.numel() if dtype == torch.bfloat16 else every.numel() + 3 * every.numel() // 8)
    assert torch.equal(_bits(join_float(exp, raw, dtype)), _bits(every))


def test_fp32_bit_patterns_survive_split_and_join() -> None:
    g = torch.Generator().manual_seed(0)
    pats = torch.randint(-(1 << 31), (1 << 31) - 1, (4099,), generator=g, dtype=torch.int64).to(torch.int32)
    pats[:4] = torch.tensor([0, -(1 << 31), 0x7F800000, 0x7FC00001], dtype=torch.int32)  # +0, -0, inf, a NaN
    w = pats.view(torch.float32)
    exp, raw = split_float(w)
    assert raw.numel() == 3 * w.numel()
    assert torch.equal(_bits(join_float(exp, raw, torch.float32)), pats)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decoded_weights_and_logits_are_bit_identical(dtype: torch.dtype) -> None:
    model = _cast(tiny_model("llama"), dtype)
    before = {n: lin.weight.detach().clone() for n, lin in quant.target_linears(model).items()}
    ref = _logits(model)
    lines: list[str] = []
    quant.quantize_(model, LosslessConfig(), progress=lines.append)
    layers = _lossless(model)
    assert sorted(layers) == sorted(before) and len(layers) == 14
    assert lines[0].startswith(f"model.layers.0.self_attn.q_proj: lossless {str(dtype)[6:]}, ")
    for name, w in before.items():
        dec = layers[name].decode()
        assert dec.dtype == dtype and torch.equal(_bits(dec), _bits(w)), name
        assert torch.equal(_bits(layers[name].weight), _bits(w))
    assert torch.equal(_logits(model), ref)
    assert model.config.acip_quant == LosslessConfig().to_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_load_is_bit_identical_and_reported_bytes_are_the_files(tmp_path: Path, dtype: torch.dtype) -> None:
    model = quant.quantize_(_cast(tiny_model("llama", seed=3), dtype), "lossless")
    ref = _logits(model)
    rep = quant.report(model)
    t = rep.total
    assert t["layers"] == 14 and all(r.method == "lossless" and r.rel_error == 0.0 for r in rep.rows)
    assert t["bits"] < (11.5 if dtype == torch.bfloat16 else 14.5) < 16
    assert t["bits"] == pytest.approx(8 * (t["stream_bytes"] + t["table_bytes"] + t["raw_bytes"]) / t["params"])
    assert "raw planes" in str(rep)

    model.save_pretrained(tmp_path / "exact")
    header, start = _header(tmp_path / "exact" / "model.safetensors")
    size = lambda key: header[key]["data_offsets"][1] - header[key]["data_offsets"][0]  # noqa: E731
    stored = sum(size(f"{n}.{b}") for n in _lossless(model) for b in ("exp_stream", "exp_table", "raw") if f"{n}.{b}" in header)
    assert stored + 32 * t["layers"] == t["coded_bytes"]  # + the sha256 each stream keeps in the config
    assert (tmp_path / "exact" / "model.safetensors").stat().st_size - start == t["model_bytes"]

    again = acip.load(tmp_path / "exact")
    assert isinstance(again.model.layers[1].mlp.down_proj, LosslessLinear)
    out = _logits(again)
    assert out.dtype == dtype and torch.equal(out, ref)
    for name, m in _lossless(model).items():
        assert torch.equal(_bits(again.get_submodule(name).weight), _bits(m.weight)), name
    assert quant.report(again).total == t


@pytest.mark.parametrize("part", ["exp_stream", "raw"])
def test_corrupted_tensor_raises_checksum_error_naming_it(part: str) -> None:
    model = quant.quantize_(_cast(tiny_model("llama"), torch.bfloat16), LosslessConfig(target_modules=["o_proj"]))
    name = "model.layers.1.self_attn.o_proj"
    m: LosslessLinear = model.get_submodule(name)
    getattr(m, part)[5] ^= 0x21
    with pytest.raises(ChecksumError, match=name) as err:
        m.decode()
    assert err.value.tensor == (name if part == "exp_stream" else f"{name}.raw")


def test_corrupted_file_fails_on_first_use_when_not_verified(tmp_path: Path) -> None:
    model = quant.quantize_(_cast(tiny_model("llama"), torch.bfloat16), "lossless")
    model.save_pretrained(tmp_path / "x")
    path = tmp_path / "x" / "model.safetensors"
    header, start = _header(path)
    key = "model.layers.0.mlp.up_proj.exp_stream"
    data = bytearray(path.read_bytes())
    data[start + header[key]["data_offsets"][0] + 7] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):  # the manifest catches it first
        acip.load(tmp_path / "x")
    loaded = acip.load(tmp_path / "x", verify=False)
    with pytest.raises(ChecksumError, match="model.layers.0.mlp.up_proj"):
        _logits(loaded)


def test_float64_is_refused_naming_dtype_and_fix() -> None:
    model = _cast(tiny_model("llama"), torch.float64)
    with pytest.raises(TypeError, match=r"torch\.float64.*model\.to\(torch\.bfloat16\)"):
        quant.quantize_(model, "lossless")
    assert not _lossless(model) and not model.config.acip_layout


def test_fp32_is_coded_the_same_way() -> None:
    model = quant.quantize_(tiny_model("llama"), "lossless")  # fp32 weights: 24 raw bits + the coded exponent
    t = quant.report(model).total
    assert 24 < t["bits"] < 28


def test_config_validation_aliases_and_dicts() -> None:
    assert quant.resolve_config("LOSSLESS") == LosslessConfig()
    cfg = quant.resolve_config({"name": "lossless", "chunk_bytes": "4096", "exclude_modules": ["down_proj"]})
    assert cfg == LosslessConfig(chunk_bytes=4096, exclude_modules=("down_proj",))
    assert cfg.to_dict()["exclude_modules"] == ["down_proj"]
    bad = [({"chunk_bytes": 16}, ValueError, "chunk_bytes must be >= 1024"),
           ({"chunk_bytes": 1.5}, TypeError, "chunk_bytes must be an integer"),
           ({"backend": "zip"}, ValueError, "backend='zip'"),
           ({"target_modules": "("}, ValueError, "LosslessConfig.target_modules"),
           ({"lam": 3.9}, TypeError, "unknown fields")]
    for fields, error, message in bad:
        with pytest.raises(error, match=message):
            quant.resolve_config({"name": "lossless", **fields})
    model = quant.quantize_(_cast(tiny_model("llama"), torch.bfloat16), cfg)
    assert len(_lossless(model)) == 12 and not any(n.endswith("down_proj") for n in _lossless(model))


def test_constriction_backend_round_trips(tmp_path: Path) -> None:
    pytest.importorskip("constriction")
    model = _cast(tiny_model("llama"), torch.bfloat16)
    ref = _logits(model)
    quant.quantize_(model, LosslessConfig(backend="constriction", chunk_bytes=1024, target_modules=["gate_proj"]))
    model.save_pretrained(tmp_path / "c")
    again = acip.load(tmp_path / "c")
    assert again.model.layers[0].mlp.gate_proj.entry["codec"]["backend"] == "constriction"
    assert torch.equal(_logits(again), ref)


def test_export_quantize_lossless_codes_the_low_rank_factors(tmp_path: Path) -> None:
    pm = acip.parametrize(tiny_model("llama", seed=5))
    sm = acip.ScoreMap.from_singular_values(pm)
    plain = acip.export(pm, ratio=0.7, score_map=sm)
    small = acip.export(pm, ratio=0.7, score_map=sm, quantize="lossless")
    low = [n for n, m in small.named_modules() if isinstance(m, LowRankLinear)]
    assert low
    for n in low:
        for f in ("down", "up"):
            layer = small.get_submodule(f"{n}.{f}")
            assert isinstance(layer, LosslessLinear), n
            assert torch.equal(_bits(layer.weight), _bits(plain.get_submodule(f"{n}.{f}").weight))
    assert torch.equal(_logits(small), _logits(plain))
    small.save_pretrained(tmp_path / "e")
    assert torch.equal(_logits(acip.load(tmp_path / "e")), _logits(plain))
    bf = _cast(plain, torch.bfloat16)
    ref = _logits(bf)
    quant.quantize_(bf, "lossless")
    assert torch.equal(_logits(bf), ref) and quant.report(bf).total["bits"] < 12


def test_constant_weight_has_an_empty_stream_and_round_trips(tmp_path: Path) -> None:
    model = _cast(tiny_model("llama"), torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(0.5)  # one exponent value: nothing to code
    ref = _logits(model)
    quant.quantize_(model, "lossless")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.exp_stream.numel() == 0 and torch.equal(layer.decode(), torch.full((64, 64), 0.5, dtype=torch.bfloat16))
    model.save_pretrained(tmp_path / "c")
    assert torch.equal(_logits(acip.load(tmp_path / "c")), ref)


def test_loaded_layers_decode_together_on_first_use(tmp_path: Path) -> None:
    quant.quantize_(_cast(tiny_model("llama"), torch.bfloat16), "lossless").save_pretrained(tmp_path / "l")
    again = acip.load(tmp_path / "l")
    layers = list(_lossless(again).values())
    assert len(layers) == 14 and all(m._weight is None for m in layers)  # nothing decoded at load time
    _ = layers[3].weight
    assert all(m._weight is not None for m in layers)  # one batched rANS call decoded every pending layer
