"""The empirical-Fisher sensitivity (acip/quant/sensitivity.py) and what is built on it:
EntropyQuantConfig(allocation="sensitivity") (per-layer lam from calibration batches, at the bytes of
the uniform lam; "uniform" stays data-free and byte-identical to the default) and the byte-budget
export's calibrated cost model. The Fisher is checked against autograd, and a layer made fragile
(its output read out with a larger gain, or dominating the residual stream) must get more bits."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import acip
from acip.export import budget as B
from acip.quant import EntropyQuantConfig, quantize_
from acip.quant.sensitivity import allocate_hulls, fisher, lower_hull, plan_layer_lams

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
    assert lams[SENSITIVE] < plain[SENSITIVE]
    assert lams[SENSITIVE] <= sorted(lams.values())[len(lams) // 2]
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


class Readout(nn.Module):
    """``logits = head(ga * A(e) + gb * B(e))`` with ``A`` and ``B`` equal: only the gains tell them apart,
    so a relative error in ``A`` costs ``(ga / gb)^2`` times the loss of the same error in ``B``."""

    def __init__(self, ga: float, gb: float, d: int = 64, vocab: int = 96) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.A, self.B = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, d, generator=g))
            self.A.weight.copy_(torch.randn(d, d, generator=g) / d ** 0.5)
            self.B.weight.copy_(self.A.weight)
            self.head.weight.copy_(torch.randn(vocab, d, generator=g) / d ** 0.5)
        self.ga, self.gb, self.vocab = ga, gb, vocab

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, labels=None, **_):  # noqa: ANN001, ANN201
        e = self.emb(input_ids)
        logits = self.head(self.ga * self.A(e) + self.gb * self.B(e))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def test_fisher_of_a_linear_is_the_mean_squared_window_gradient():
    m = Readout(2.0, 0.5)
    calib = _calib()
    got = fisher(m, calib, {"A": m.A, "B": m.B})
    for name in ("A", "B"):
        ref = torch.zeros_like(m.A.weight)
        n = 0
        for batch in calib:
            for row in batch:  # one window per pass
                w = getattr(m, name).weight
                g, = torch.autograd.grad(m(row[None], labels=row[None]).loss, [w])
                ref += (row.numel() - 1) * g.pow(2)
                n += 1
        torch.testing.assert_close(got[name].weight, ref / n, rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad for p in m.parameters())  # the passes leave the flags as they were
    # the readout gain enters squared
    ratio = got["A"].sensitivity(m.A.weight) / got["B"].sensitivity(m.B.weight)
    assert ratio == pytest.approx(16.0, rel=1e-4)


@pytest.mark.parametrize("gains", [(4.0, 0.25), (0.25, 4.0)])
def test_the_fragile_layer_gets_more_bits(gains):
    """A wrong weighting (uniform, data-free, or the gain not squared) would give A and B the same lam."""
    m = Readout(*gains)
    cfg = EntropyQuantConfig(lam=14.5, allocation="sensitivity")
    lam = plan_layer_lams(m, {"A": m.A, "B": m.B}, cfg, _calib())
    q = quantize_(m, cfg, calib=_calib())
    fragile, robust = ("A", "B") if gains[0] > gains[1] else ("B", "A")
    assert lam[fragile] < 14.5 < lam[robust]
    rep = {r.name: r for r in acip.quant.report(q).rows}
    assert rep[fragile].coded_bytes > rep[robust].coded_bytes


def test_svd_directions_match_autograd():
    """t_j, a_j, b_j of the budget cost model's Fisher pass against autograd on the mask gate and the factors."""
    torch.manual_seed(0)
    pm = acip.parametrize(tiny_model("llama"))
    name = "model.layers.1.self_attn.o_proj"
    layer = pm.svd_layers()[name]
    calib = _calib()
    got = B._fisher(pm, calib, None)[name]
    c = layer.mask_scaling
    ortho = layer.ortho.clone().requires_grad_(True)
    base = layer.base.clone().requires_grad_(True)
    gate = torch.full((layer.max_rank,), c, requires_grad=True)
    layer.forward = lambda x: nn.functional.linear(nn.functional.linear(x, base) * gate, ortho, layer.bias)
    ref = {k: torch.zeros(layer.max_rank) for k in "tab"}
    n = 0
    try:
        for batch in calib:
            for row in batch:
                loss = pm.model(input_ids=row[None], labels=row[None]).loss
                go, gb, gg = torch.autograd.grad(loss, [ortho, base, gate])
                k = row.numel() - 1
                ref["t"] += 0.5 * k * (c * gg).pow(2)
                ref["a"] += 0.5 * k * (go.pow(2) * ortho.detach().pow(2)).sum(0)
                ref["b"] += 0.5 * k * (gb.pow(2) * base.detach().pow(2)).sum(1)
                n += 1
    finally:
        del layer.forward
    for k in "tab":
        torch.testing.assert_close(getattr(got, k), ref[k] / n, rtol=2e-3, atol=1e-12)


def test_budget_gives_the_fragile_layer_more_bytes():
    """A down projection scaled x20 dominates the residual stream (the other layers drown in it after the
    norm): with the Fisher it gets more bytes than without calibration, and than in the unscaled model."""
    calib = _calib()

    def layer_bytes(scale: float, with_calib: bool) -> int:
        torch.manual_seed(0)
        m = tiny_model("llama")
        with torch.no_grad():
            m.get_submodule(SENSITIVE).weight *= scale
        pm = acip.parametrize(m)
        pm.score_map = acip.ScoreMap.from_singular_values(pm)
        small = B.export_budget(pm, bits_per_param=3.0, lams=(0.0, 3.9, 14.5, 58.0),
                                calib=calib if with_calib else None)
        return small.config.acip_export["budget"]["layers"][SENSITIVE]["bytes"]

    fragile = layer_bytes(20.0, True)
    assert fragile > layer_bytes(20.0, False)
    assert fragile > layer_bytes(1.0, True)


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
