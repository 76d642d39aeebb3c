"""quantize_ as the one verb: registry dispatch, aliases, hostile inputs, rank-0 exports, one ChecksumError."""
from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import acip
import acip.core.io
from acip import quant
from acip.core import LowRankLinear, NoTargetLayersError
from acip.quant import EntQuantLinear, EntropyQuantConfig, NF4Config, register_quantizer
from acip.quant import registry
from conftest import tiny_model

QUANT = Path(acip.__file__).parent / "quant"
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


@dataclass
class HalfConfig:
    """A toy quantizer: weights rounded to float16."""

    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | None = None


class HalfLinear(nn.Linear):
    def describe(self) -> str:
        return "fp16 weight"


def test_user_account_of_the_public_surface() -> None:
    assert sorted(quant.__all__) == sorted([
        "ChecksumError", "EntQuantLinear", "EntropyQuantConfig", "LosslessConfig", "LosslessLinear", "NF4Config",
        "quantize_", "register_quantizer", "report", "set_decode_mode"])
    assert not hasattr(quant, "apply")
    for plumbing in ("quantized_layers", "target_linears", "decode_many", "quantize_weight", "CodecError"):
        assert hasattr(quant, plumbing)  # importable, unlisted


def test_custom_config_type_is_registered_and_dispatched(clean_registry: None) -> None:
    seen = []

    @register_quantizer(HalfConfig, "half")
    def _half(lin: nn.Linear, cfg: HalfConfig, name: str) -> nn.Module:
        seen.append(name)
        new = HalfLinear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight.data = lin.weight.data.half().float()
        if lin.bias is not None:
            new.bias.data = lin.bias.data.clone()
        return new

    model = tiny_model("llama")
    lines: list[str] = []
    quant.quantize_(model, HalfConfig(target_modules=["q_proj", "v_proj"]), progress=lines.append)
    assert seen == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert isinstance(model.model.layers[1].self_attn.v_proj, HalfLinear)
    assert isinstance(model.model.layers[1].self_attn.k_proj, nn.Linear)
    assert lines[0].startswith("model.layers.0.self_attn.q_proj: fp16 weight, ")
    assert registry.registered_configs()["HalfConfig"] == ["half"]
    other = quant.quantize_(tiny_model("llama"), "HALF")  # an alias of HalfConfig(), case-insensitive
    assert sum(isinstance(m, HalfLinear) for m in other.modules()) == 14
    assert len(seen) == 4 + 14


def test_unknown_config_type_names_the_registered_ones() -> None:
    @dataclass
    class Int4Config:
        group: int = 64

    with pytest.raises(TypeError, match=r"type Int4Config.*EntropyQuantConfig \(or 'entquant', 'entropy'\).*"
                                        r"NF4Config \(or 'nf4'\).*register_quantizer\(Int4Config\)"):
        quant.quantize_(tiny_model("llama"), Int4Config())
    with pytest.raises(ValueError, match=r"unknown quantizer 'fp4'; registered: EntropyQuantConfig"):
        quant.quantize_(tiny_model("llama"), "fp4")
    with pytest.raises(ValueError, match=r"unknown quantizer name='int3'"):
        quant.quantize_(tiny_model("llama"), {"name": "int3"})
    with pytest.raises(TypeError, match=r"NF4Config got unknown fields \['lam'\]"):
        quant.quantize_(tiny_model("llama"), {"name": "nf4", "lam": 3.0})


def test_string_aliases_map_to_default_configs() -> None:
    assert registry.resolve_config("entropy") == EntropyQuantConfig()
    assert registry.resolve_config("entquant") == EntropyQuantConfig()
    assert registry.resolve_config("nf4") == NF4Config()
    assert registry.resolve_config({"name": "nf4", "target_modules": ["up_proj"]}) == NF4Config(("up_proj",))
    assert registry.resolve_config({"lam": 3.9}) == EntropyQuantConfig(lam=3.9)  # a dict defaults to entropy
    cfg = NF4Config(exclude_modules=r".*\.0\..*")
    assert registry.resolve_config(cfg) is cfg


def test_a_string_target_is_a_full_match_regex() -> None:
    model = tiny_model("llama")
    quant.quantize_(model, EntropyQuantConfig(lam=14.5, target_modules=r".*\.1\.self_attn\.(q|v)_proj"))
    assert sorted(quant.quantized_layers(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert model.config.acip_quant["target_modules"] == r".*\.1\.self_attn\.(q|v)_proj"
    # a bare name as a string is a regex that must match the whole dotted name: nothing here
    with pytest.raises(NoTargetLayersError, match=r"target_modules='q_proj'.*regular expression.*\['q_proj'"):
        quant.quantize_(tiny_model("llama"), EntropyQuantConfig(target_modules="q_proj"))
    with pytest.raises(ValueError, match=r"EntropyQuantConfig.target_modules='\(q_proj' is a string, so it is read "
                                         r"as a regular expression, and it does not compile"):
        EntropyQuantConfig(target_modules="(q_proj")
    with pytest.raises(ValueError, match=r"NF4Config.exclude_modules='all-linear' would exclude every layer"):
        NF4Config(exclude_modules="all-linear")


def test_int8_weights_are_refused_naming_layer_and_dtype() -> None:
    model = tiny_model("llama")
    v = model.model.layers[1].self_attn.v_proj
    v.weight = nn.Parameter(torch.ones_like(v.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"model.layers.1.self_attn.v_proj: weight dtype torch.int8 is not a float "
                                        r"type.*exclude_modules=\['model.layers.1.self_attn.v_proj'\]"):
        quant.quantize_(model, EntropyQuantConfig(lam=14.5))
    assert not quant.quantized_layers(model)  # refused before any layer changed
    assert not getattr(model.config, "acip_layout", None)
    quant.quantize_(model, EntropyQuantConfig(lam=14.5, exclude_modules=["model.layers.1.self_attn.v_proj"]))
    assert len(quant.quantized_layers(model)) == 13


def test_a_model_without_linear_layers_is_an_error() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(NoTargetLayersError, match=r"no linear layers in Sequential.*present: none.*quantize_ replaces "
                                                  r"nn.Linear layers"):
        quant.quantize_(model, "entropy")
    with pytest.raises(NoTargetLayersError, match=r"present: \['lm_head'\].*not GPT-2's Conv1D"):
        quant.quantize_(tiny_model("gpt2"), "nf4")  # its blocks hold Conv1D, the head is never quantized
    done = quant.quantize_(tiny_model("llama"), EntropyQuantConfig(lam=14.5, target_modules=["up_proj"]))
    with pytest.raises(NoTargetLayersError, match="already quantized"):  # nothing left to quantize
        quant.quantize_(done, EntropyQuantConfig(lam=14.5, exclude_modules=r".*\.(q|k|v|o|gate|down)_proj"))


def _rank0_export() -> tuple[nn.Module, str]:
    """Export a tiny model whose score map ranks one layer's directions below everything else."""
    pm = acip.parametrize(tiny_model("llama", seed=5))
    sm = acip.ScoreMap.from_singular_values(pm)
    zeroed = "model.layers.0.mlp.up_proj"
    scores = {n: s.clone() for n, s in sm.scores.items()}
    scores[zeroed] = torch.full_like(scores[zeroed], -10.0)
    sm.set_scores(scores)
    return acip.export(pm, ratio=0.85, score_map=sm), zeroed


def test_rank0_layer_of_an_export_is_skipped_and_reported(tmp_path: Path) -> None:
    small, zeroed = _rank0_export()
    layer = small.get_submodule(zeroed)
    assert isinstance(layer, LowRankLinear) and layer.rank == 0
    ref = _logits(small)
    lines: list[str] = []
    quant.quantize_(small, EntropyQuantConfig(lam=3.9), progress=lines.append)
    assert f"{zeroed}.down: skipped, weight (0, 64) is empty (a factor of a rank-0 layer): nothing to quantize" in lines
    assert any(line.startswith(f"{zeroed}.up: skipped, weight (96, 0)") for line in lines)
    q = quant.quantized_layers(small)
    assert q and not any(n.startswith(zeroed) for n in q)
    rep = quant.report(small)
    assert rep.empty == [f"{zeroed}.down", f"{zeroed}.up"]
    assert "skipped, empty weight (rank 0, nothing to quantize)" in str(rep)
    out = _logits(small)
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) < 0.2
    small.save_pretrained(tmp_path / "r0")
    assert torch.equal(_logits(acip.load(tmp_path / "r0")), out)


def test_nf4_skips_rank0_factors_too() -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [bench] extra")
    small, zeroed = _rank0_export()
    lines: list[str] = []
    quant.quantize_(small, "nf4", progress=lines.append)
    assert any(line.startswith(f"{zeroed}.down: skipped") for line in lines)
    assert quant.report(small).empty == [f"{zeroed}.down", f"{zeroed}.up"]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (relative ones as ``.x``; ``from . import x`` as ``.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.update([base] if node.module else [base + a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_import_circle_between_the_api_nf4_and_the_registry() -> None:
    api, nf4, reg = (_imports(QUANT / f) for f in ("api.py", "nf4.py", "registry.py"))
    assert not {".nf4", "acip.quant.nf4"} & api
    assert not {".api", "acip.quant.api"} & nf4
    assert not {".api", ".nf4", ".report", "acip.quant.api", "acip.quant.nf4"} & reg
    assert ".registry" in api and ".registry" in nf4  # both register below the verb


def test_one_checksum_error_class_for_all_of_acip() -> None:
    assert quant.ChecksumError is acip.core.io.ChecksumError is acip.core.ChecksumError
    assert quant.codec.ChecksumError is acip.core.io.ChecksumError  # re-exported, not a second class
    assert not any(isinstance(v, type) and issubclass(v, Exception) and v.__name__ == "ChecksumError"
                   and v is not acip.core.io.ChecksumError for m in (quant.codec, quant.module, quant.nf4)
                   for v in vars(m).values())


@pytest.mark.parametrize("part", ["codes_stream", "scales"])
def test_corrupted_layer_tensor_raises_checksum_error_naming_it(part: str) -> None:
    model = quant.quantize_(tiny_model("llama"), EntropyQuantConfig(lam=14.5, target_modules=["o_proj"]))
    m: EntQuantLinear = model.model.layers[1].self_attn.o_proj
    broken = copy.deepcopy(m)
    getattr(broken, part)[3] ^= 0x11
    name = "model.layers.1.self_attn.o_proj"
    with pytest.raises(acip.core.io.ChecksumError, match=name) as err:
        broken.decode()
    assert err.value.tensor == (name if part == "codes_stream" else f"{name}.scales")
    assert torch.equal(m.decode(), m.weight)  # the intact layer still decodes to its weight


def test_a_handler_that_fails_midway_leaves_a_saveable_model(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6  # beyond e4m3's dynamic range
    with pytest.raises(quant.OutlierError, match="model.layers.1.mlp.up_proj"):
        quant.quantize_(model, EntropyQuantConfig(lam=14.5, fallback="raise", target_modules=["up_proj"]))
    assert list(model.config.acip_layout) == ["model.layers.0.mlp.up_proj"] == list(quant.quantized_layers(model))
    model.save_pretrained(tmp_path / "half")
    assert torch.equal(_logits(acip.load(tmp_path / "half")), _logits(model))
