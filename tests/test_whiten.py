"""Activation-aware (whitened) SVD baseline: exact at start, lower output error, rebuild from file."""
import copy

import pytest
import torch
from torch import nn

import acip
from acip.core.svd_linear import SVDLinear
from acip.core.whiten import calibrate_whitening


def test_whitened_truncation_beats_plain_on_calibration_data():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=False)
    x = torch.randn(256, 32) @ torch.randn(32, 32) * torch.linspace(0.01, 3, 32)  # anisotropic inputs
    lw = torch.linalg.cholesky(x.double().t() @ x.double() + 1e-6 * torch.eye(32, dtype=torch.float64)).float()
    plain, white = SVDLinear.from_linear(lin), SVDLinear.from_linear(lin, whitening=lw)
    assert torch.allclose(white(x), lin(x), atol=1e-4)
    with torch.no_grad():
        for layer in (plain, white):
            layer.mask[8:] = -1  # rank 8, best directions first (singular values descend)
    err_plain = (plain(x) - lin(x)).norm()
    err_white = (white(x) - lin(x)).norm()
    assert err_white < 0.8 * err_plain


def test_activation_aware_score_map_exports_and_reloads(tiny_llama, tokens, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "base")
    model, _ = acip.load_base(str(tmp_path / "base"))
    calib = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    factors = calibrate_whitening(model, calib)
    ref = model(input_ids=tokens).logits
    pm = acip.parametrize(copy.deepcopy(model), whitening=factors)
    assert torch.allclose(pm(input_ids=tokens).logits, ref, atol=1e-4)
    sm = acip.ScoreMap.from_singular_values(pm)
    assert sm.method == "activation_aware"
    small = acip.export(pm, 0.5, score_map=sm)
    pm.score_map = sm
    pm.save_pretrained(tmp_path / "run")  # the basis (whitening factors) is part of the model's state
    with pytest.raises(acip.ScoreMapError, match="activation-aware basis"):
        acip.export(acip.ScoreMap.load(tmp_path / "run"), 0.5)  # a bare map cannot rebuild the basis
    again = acip.export(tmp_path / "run", 0.5)  # rebuilt from the directory: base model + saved factors
    assert torch.allclose(again(input_ids=tokens).logits, small(input_ids=tokens).logits, atol=1e-5)


def test_activation_aware_one_call_matches_the_manual_recipe(tiny_llama, tokens):
    calib = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    white = acip.activation_aware(tiny_llama, calib, svd_dtype=torch.float64)
    sm = white.score_map
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())  # untouched
    manual = acip.ScoreMap.from_singular_values(
        acip.parametrize(copy.deepcopy(tiny_llama), whitening=calibrate_whitening(tiny_llama, calib)))
    assert sm.method == "activation_aware" and sm.names == manual.names
    for n in sm.names:
        assert torch.allclose(sm.scores[n], manual.scores[n], rtol=1e-4, atol=1e-6)
    small = acip.export(white, 0.6)
    assert acip.size_ratio(small) <= 0.6
    with pytest.raises(ValueError, match="no batches"):
        acip.activation_aware(tiny_llama, [])


def test_layers_reading_one_input_share_one_gram(tiny_llama, monkeypatch):
    """q/k/v (and gate/up) read the same tensor: one fp64 Gram each group, factors bit-identical
    to one Gram per layer, and every layer still gets its own (saveable) tensor."""
    calib = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    grams = []
    real_mm = torch.Tensor.__matmul__

    def counting(a, b):
        if a.dtype == torch.float64:
            grams.append(a.shape)
        return real_mm(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    shared = calibrate_whitening(tiny_llama, calib)
    n_shared, grams[:] = len(grams), []
    alone = calibrate_whitening(tiny_llama, calib, share_inputs=False)
    n_alone = len(grams)
    monkeypatch.undo()
    assert shared.keys() == alone.keys()
    assert all(torch.equal(shared[n], alone[n]) for n in shared)
    blocks = len(tiny_llama.model.layers)
    assert n_alone == 3 * 7 * blocks and n_shared == 3 * 4 * blocks  # per batch: q,k,v,o,gate,up,down vs qkv,o,gu,down
    attn = "model.layers.0.self_attn"
    assert torch.equal(shared[f"{attn}.q_proj"], shared[f"{attn}.v_proj"])
    assert shared[f"{attn}.q_proj"].data_ptr() != shared[f"{attn}.k_proj"].data_ptr()
    assert not torch.equal(shared[f"{attn}.q_proj"], shared[f"{attn}.o_proj"])
