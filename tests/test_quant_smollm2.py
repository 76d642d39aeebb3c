"""One test on the real SmolLM2-135M: real weights quantize, code losslessly and keep outputs."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")

import acip  # noqa: E402
from acip import quant  # noqa: E402
from acip.quant.codec import available_backends, decode_codes, decode_many, encode_codes  # noqa: E402


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    return acip.load_base("smollm2-135m")


@pytest.mark.slow
def test_real_layers_quantize_and_decode_bit_identical(smollm2: tuple) -> None:
    model, tok = smollm2
    _, heldout = acip.data.kjv_split()
    ids = tok(" ".join(heldout[:40]), return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref = model(ids).logits
    layer = model.model.layers[1]
    originals = {n: m.weight.detach().clone() for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    quant.quantize_(model, quant.EntropyQuantConfig(lam=14.5, target_modules=["layers.1." + n for n in originals]))
    try:
        q = {n.split("layers.1.")[1]: m for n, m in quant.quantized_layers(model).items()}
        assert set(q) == set(originals)
        rep = quant.report(model)
        assert 2.5 < rep.total["bits"] < 4.0 and rep.fallbacks == []
        names = sorted(q)
        decoded = decode_many([q[n].encoded() for n in names])  # the stored streams, one batch
        for name, codes in zip(names, decoded):
            m = q[name]
            assert torch.equal(m.dequantize_codes(codes), m._weight)  # == the quantizer's output
            for backend in available_backends():  # real codes: every backend is lossless
                assert torch.equal(decode_codes(encode_codes(codes, 65536, backend)), codes)
            err = float((m.weight - originals[name]).abs().sum() / originals[name].abs().sum())
            assert err == pytest.approx(m.entry["stats"]["rel_error"], rel=1e-4)
        with torch.no_grad():
            out = model(ids).logits
        nll_ref = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:])
        nll = torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:])
        assert float(nll) < float(nll_ref) + 0.05  # one layer at ~3 bits: perplexity within ~5%
    finally:  # give the shared fixture its dense layers back
        for name, w in originals.items():
            parent, _, child = name.rpartition(".")
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            setattr(layer.get_submodule(parent), child, lin)
