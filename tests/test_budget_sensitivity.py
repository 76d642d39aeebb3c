"""EntropyQuantConfig(allocation="sensitivity"): per-layer lam from calibration batches, at the
bytes of the uniform lam; "uniform" stays data-free and byte-identical to the default."""
from __future__ import annotations

import copy

import pytest
import torch

import acip
from acip.quant import EntropyQuantConfig, quantize_
from acip.quant.optimize import allocate_hulls, lower_hull

from conftest import tiny_model

SENSITIVE = "model.layers.1.mlp.down_proj"


def _calib():
    return [torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_uniform_is_byte_identical_and_data_free():
    m = tiny_model("llama")
    a = quantize_(copy.deepcopy(m), EntropyQuantConfig(lam=14.5))
    b = quantize_(copy.deepcopy(m), EntropyQuantConfig(lam=14.5, allocation="uniform"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.to_json_string() == b.config.to_json_string()
    assert "allocation" not in a.config.acip_quant
    with pytest.raises(ValueError, match="allocation='sensitivity'"):
        quantize_(copy.deepcopy(m), EntropyQuantConfig(lam=14.5), calib=_calib())
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize_(copy.deepcopy(m), EntropyQuantConfig(lam=14.5, allocation="sensitivity"))
    with pytest.raises(ValueError, match="allocation"):
        EntropyQuantConfig(allocation="greedy")


def _layer_lams(scale: float) -> tuple[dict[str, float], torch.nn.Module]:
    m = tiny_model("llama")
    with torch.no_grad():
        m.get_submodule(SENSITIVE).weight *= scale  # dominates the residual stream: its error costs the most loss
    q = quantize_(m, EntropyQuantConfig(lam=14.5, allocation="sensitivity"), calib=_calib())
    return q.config.acip_quant["layer_lam"], q


def test_sensitive_layer_gets_a_smaller_lam(tmp_path):
    plain, _ = _layer_lams(1.0)
    lams, q = _layer_lams(20.0)
    assert lams[SENSITIVE] < 14.5
    assert lams[SENSITIVE] == min(lams.values())
    assert lams[SENSITIVE] < plain[SENSITIVE]
    assert len(set(lams.values())) > 1
    # matched bytes: within a few percent of the uniform rate on the same model
    m = tiny_model("llama")
    with torch.no_grad():
        m.get_submodule(SENSITIVE).weight *= 20.0
    uni = acip.quant.report(quantize_(m, EntropyQuantConfig(lam=14.5))).total["coded_bytes"]
    got = acip.quant.report(q).total["coded_bytes"]
    assert got <= 1.03 * uni
    q.save_pretrained(tmp_path)  # per-layer lams are recorded and the model reloads
    again = acip.load(tmp_path)
    x = torch.randint(0, 96, (1, 8))
    torch.testing.assert_close(again(x).logits, q(x).logits)


def test_hull_allocation_is_exact_on_a_small_case():
    import itertools

    import numpy as np

    rng = np.random.default_rng(0)
    pts = []
    for _ in range(4):
        b = np.sort(rng.uniform(1, 10, 5))
        d = np.sort(rng.uniform(0, 1, 5))[::-1].copy()
        pts.append((b, d))
    for budget in (8.0, 15.0, 22.0, 30.0):
        pick = allocate_hulls(pts, budget)
        got = sum(p[1][i] for p, i in zip(pts, pick))
        assert sum(p[0][i] for p, i in zip(pts, pick)) <= budget + 1e-9
        best = min((sum(p[1][i] for p, i in zip(pts, c)) for c in itertools.product(range(5), repeat=4)
                    if sum(p[0][i] for p, i in zip(pts, c)) <= budget), default=None)
        assert best is not None and got <= best * 1.25 + 1e-9  # Lagrangian + greedy: near the exact optimum
    h = lower_hull(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 0.9, 0.2, 0.1]))
    assert h.tolist() == [0, 2, 3]
