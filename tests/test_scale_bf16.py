"""bf16 end to end on the tiny Llama (CPU): factors bf16 (SVD in fp32), masks/scores fp32, export bf16."""
from __future__ import annotations

import pytest
import torch

import acip
from acip.core.parametrize import ACIPModel, parametrize
from acip.core.svd_linear import SVDLinear

from conftest import tiny_model

BF16 = torch.bfloat16


def _bf16_model():
    return tiny_model("llama").to(BF16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("svd_dtype", ["float32", "float64"])
def test_bf16_parametrize_dtypes_and_outputs(tokens, svd_dtype):
    dense = _bf16_model()
    ref = dense(input_ids=tokens).logits
    pm = parametrize(_bf16_model(), svd_dtype=svd_dtype)
    layers = pm.svd_layers()
    assert layers
    for l in layers.values():
        assert l.ortho.dtype == BF16 and l.base.dtype == BF16
        assert l.mask.dtype == torch.float32 and l.singular_values.dtype == torch.float32
        assert l.bias is None or l.bias.dtype == BF16
    out = pm(input_ids=tokens).logits
    assert out.dtype == BF16
    assert _rel(out, ref) < 3e-2  # bf16 round-off of the factors only
    sm = acip.ScoreMap.from_singular_values(pm)
    assert all(s.dtype == torch.float32 for s in sm.scores.values())


def test_bf16_factors_reproduce_the_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80).to(BF16)
    layer = SVDLinear.from_linear(lin, svd_dtype=torch.float32)
    w = (layer.ortho.double() * layer.mask_scaling) @ layer.base.double()
    assert _rel(w, lin.weight.double()) < 1e-2
    x = torch.randn(5, 48, dtype=BF16)
    assert _rel(layer(x), lin(x)) < 2e-2


def test_bf16_mask_gradient_is_fp32(tokens):
    pm = parametrize(_bf16_model(), svd_dtype="float32")
    out = pm(input_ids=tokens, labels=tokens)
    assert out.loss.dtype == torch.float32  # transformers upcasts the logits for the loss
    out.loss.backward()
    grads = [m.grad for m in pm.mask_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)


def test_bf16_autocast_mixed_forward(tokens):
    """bf16-mixed: fp32 factors and masks, matmuls under CPU autocast in bf16."""
    pm = parametrize(tiny_model("llama"), svd_dtype="float32")
    with torch.autocast("cpu", dtype=BF16):
        out = pm(input_ids=tokens, labels=tokens)
    out.loss.float().backward()
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in pm.mask_parameters())


def test_bf16_export_saves_reloads_and_generates(tmp_path, tokens):
    pm = parametrize(_bf16_model(), svd_dtype="float32")
    sm = acip.ScoreMap.from_singular_values(pm)
    e = acip.export(pm, 0.6, score_map=sm)
    assert {p.dtype for p in e.parameters()} == {BF16}
    src_ptrs = {t.untyped_storage().data_ptr() for t in list(pm.parameters()) + list(pm.buffers())}
    assert not src_ptrs & {t.untyped_storage().data_ptr() for t in list(e.parameters()) + list(e.buffers())}
    logits = e(input_ids=tokens).logits
    assert logits.dtype == BF16 and torch.isfinite(logits.float()).all()
    e.save_pretrained(tmp_path / "exp")
    back = acip.load(tmp_path / "exp")
    assert {p.dtype for p in back.parameters()} == {BF16}
    sd, bd = e.state_dict(), back.state_dict()
    assert sd.keys() == bd.keys() and all(torch.equal(sd[k], bd[k]) for k in sd)
    # the rotary table of a reloaded model is rebuilt in fp32 (the source's was cast to bf16 by .to())
    assert _rel(back(input_ids=tokens).logits, logits) < 2e-2
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    g = back.generate(tokens[:1], **kw)
    assert g.shape == (1, tokens.shape[1] + 4) and torch.equal(g[:, : tokens.shape[1]], tokens[:1])
    assert e.generate(tokens[:1], **kw).shape == g.shape


@pytest.mark.parametrize("save_factors", [False, True])
def test_bf16_acip_model_save_and_reload(tmp_path, tokens, save_factors):
    pm = parametrize(_bf16_model(), svd_dtype="float32")
    pm.score_map = acip.ScoreMap.from_singular_values(pm)
    with torch.no_grad():
        for m in pm.mask_parameters():
            m[::3] = -1.0
    ref = pm(input_ids=tokens).logits
    pm.save_pretrained(tmp_path / "pm", save_factors=save_factors)
    back = ACIPModel.from_pretrained(tmp_path / "pm", model=_bf16_model())
    assert next(iter(back.svd_layers().values())).base.dtype == BF16
    assert torch.equal(back(input_ids=tokens).logits, ref)


def test_parametrize_explicit_device_is_identical(tokens):
    a = parametrize(tiny_model("llama"))
    b = parametrize(tiny_model("llama"), None, "cpu")
    for (n, x), (_, y) in zip(a.svd_layers().items(), b.svd_layers().items()):
        assert torch.equal(x.ortho, y.ortho) and torch.equal(x.base, y.base), n
    assert torch.equal(a(input_ids=tokens).logits, b(input_ids=tokens).logits)
