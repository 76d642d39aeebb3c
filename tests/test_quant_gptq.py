"""EntropyQuantConfig(fmt="uniform", rounding="gptq"): GPTQ's error feedback on the ECSQ grid."""
from __future__ import annotations

import copy

import pytest
import torch

from acip.core.whiten import input_grams
from acip.quant import EntropyQuantConfig, quantize_
from acip.quant.module import EntQuantLinear
from acip.quant.optimize import gptq_codes, quantize_uniform, uniform_steps, UNIFORM_STEP_DEN


def _correlated(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated columns (what makes GPTQ's feedback pay)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5 + 2.0 * torch.eye(dim)
    return torch.randn(tokens, 8, generator=g) @ torch.randn(8, dim, generator=g) + torch.randn(tokens, dim, generator=g) @ mix


def _steps(W: torch.Tensor, c: float) -> torch.Tensor:
    t, off = uniform_steps(W, c)
    return torch.exp2((t.float() + off) / UNIFORM_STEP_DEN)


def test_gptq_lowers_the_output_error_and_equals_nearest_for_white_inputs():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 80, generator=g)
    X = _correlated(600, 80)
    s = _steps(W, 0.6)
    near = torch.round(W / s[:, None]).clamp(-127, 127)
    fed = gptq_codes(W, s, X.t() @ X)

    def out_err(q: torch.Tensor) -> float:
        return float(((W - q * s[:, None]) @ X.t()).pow(2).sum())

    assert out_err(fed) < 0.7 * out_err(near)
    assert fed.abs().max() <= 127 and torch.equal(fed, fed.round())
    # with uncorrelated inputs (H = I) there is nothing to feed back: exactly round-to-nearest
    assert torch.equal(gptq_codes(W, s, torch.eye(80) * 5.0), near)


def test_gptq_refuses_a_gram_of_the_wrong_size_and_a_broken_one():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match="16 input columns"):
        gptq_codes(W, torch.ones(8), torch.eye(12))
    with pytest.raises(ValueError, match="raise damp"):
        gptq_codes(W, torch.ones(8), -torch.eye(16))


def test_quantize_uniform_with_a_gram_keeps_the_steps_of_nearest():
    W = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    X = _correlated(300, 40)
    a = quantize_uniform(W, 13.5)
    b = quantize_uniform(W, 13.5, gram=X.t() @ X)
    assert torch.equal(a.scales, b.scales) and a.step_offset == b.step_offset and b.method == "ecsq"
    assert not torch.equal(a.codes, b.codes)


def test_config_validation_and_saved_form():
    with pytest.raises(ValueError, match="fmt='uniform'"):
        EntropyQuantConfig(rounding="gptq")  # e4m3 by default
    with pytest.raises(ValueError, match="rounding"):
        EntropyQuantConfig(fmt="uniform", rounding="closest")
    with pytest.raises(ValueError, match="damp"):
        EntropyQuantConfig(fmt="uniform", rounding="gptq", damp=0)
    with pytest.raises(TypeError, match="square tensor"):
        EntropyQuantConfig(fmt="uniform", rounding="gptq", gram=torch.ones(3, 4))
    plain = EntropyQuantConfig(fmt="uniform").to_dict()
    assert not {"rounding", "damp", "gram"} & set(plain)  # saved configs as before the option
    d = EntropyQuantConfig(fmt="uniform", rounding="gptq", damp=0.05, gram=torch.eye(4)).to_dict()
    assert d["rounding"] == "gptq" and d["damp"] == 0.05 and "gram" not in d


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 96, (2, 24), generator=g) for _ in range(4)]


def test_quantize_gptq_needs_calib_and_lowers_every_layers_output_error(tiny_llama, tmp_path):
    cfg = EntropyQuantConfig(fmt="uniform", rounding="gptq", lam=13.5)
    with pytest.raises(ValueError, match="rounding='gptq' needs calibration batches"):
        quantize_(copy.deepcopy(tiny_llama), cfg)
    calib = _calib()
    grams = input_grams(tiny_llama, (b for b in calib), "all-linear")
    near = quantize_(copy.deepcopy(tiny_llama), EntropyQuantConfig(fmt="uniform", lam=13.5))
    fed = quantize_(copy.deepcopy(tiny_llama), cfg, calib=calib)
    assert fed.config.acip_quant["rounding"] == "gptq" and "layer_lam" not in fed.config.acip_quant
    worse = []
    for name, G in grams.items():
        W = tiny_llama.get_submodule(name).weight.detach().double()

        def err(model: torch.nn.Module) -> float:
            layer = model.get_submodule(name)
            assert isinstance(layer, EntQuantLinear)
            D = W - layer.weight.detach().double()
            return float(torch.einsum("ij,jk,ik->", D, G, D))  # ||(W - What) X^T||^2

        if err(fed) >= err(near):
            worse.append(name)
    assert not worse, worse
    # saved and loaded like any entropy-coded model: the same logits
    import acip

    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    fed.save_pretrained(tmp_path / "m")
    back = acip.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(fed(ids).logits, back(ids).logits)


def test_gptq_with_sensitivity_allocation_records_the_layer_lams(tiny_llama):
    cfg = EntropyQuantConfig(fmt="uniform", rounding="gptq", allocation="sensitivity", lam=13.5)
    m = quantize_(copy.deepcopy(tiny_llama), cfg, calib=_calib())
    lams = m.config.acip_quant["layer_lam"]
    assert set(lams) == {n for n, mod in m.named_modules() if isinstance(mod, EntQuantLinear)}


def test_a_given_gram_quantizes_one_layer_without_calib(tiny_llama):
    name = "model.layers.0.self_attn.q_proj"
    grams = input_grams(tiny_llama, iter(_calib()), [name])
    cfg = EntropyQuantConfig(fmt="uniform", rounding="gptq", lam=13.5, target_modules=[name], gram=grams[name].float())
    one = quantize_(copy.deepcopy(tiny_llama), cfg)
    assert isinstance(one.get_submodule(name), EntQuantLinear)
    assert not isinstance(one.get_submodule("model.layers.0.self_attn.k_proj"), EntQuantLinear)
    both = quantize_(copy.deepcopy(tiny_llama), EntropyQuantConfig(fmt="uniform", rounding="gptq", lam=13.5,
                                                                   target_modules=[name]), calib=_calib())
    assert torch.equal(one.get_submodule(name).weight, both.get_submodule(name).weight)
    with pytest.raises(ValueError, match="without calib="):
        quantize_(copy.deepcopy(tiny_llama), cfg, calib=_calib())
