"""The estimators behind scripts/bench_quant_bound.py (the ideal-quantizer bound of BENCHMARKS.md)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the script and its siblings
import bench_quant_bound as bound  # noqa: E402


def test_code_entropy_matches_closed_form() -> None:
    assert bound.code_entropy(torch.tensor([3, 3, 3, 3])) == pytest.approx(0.0)
    assert bound.code_entropy(torch.tensor([-1, 0, 1, 2] * 50)) == pytest.approx(2.0)
    assert bound.code_entropy(torch.tensor([0, 0, 0, 1])) == pytest.approx(0.8112781, rel=1e-6)


def test_entropy_power_ratio_gaussian_and_laplacian() -> None:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(64, 8192, generator=g)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((64, 8192))
    assert bound.entropy_power_ratio(gauss, delta=1 / 32) == pytest.approx(1.0, abs=0.03)
    assert bound.entropy_power_ratio(lap, delta=1 / 32) == pytest.approx(math.e / math.pi, abs=0.03)


def test_solve_c_hits_the_rate_and_high_rate_ecsq_error() -> None:
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(128, 512, generator=g) * s for s in (0.02, 1.0)]
    c = bound.solve_c(ws, 4.0)
    assert bound.ecsq_bits(ws, c) == pytest.approx(4.0, abs=0.01)
    # high-rate ECSQ on a Gaussian: H ~ h - log2(step), h = 0.5 log2(2 pi e) -> step = 2^(h - R)
    assert c == pytest.approx(2 ** (0.5 * math.log2(2 * math.pi * math.e) - 4.0), rel=0.05)
    lins = {"a": nn.Linear(512, 128, bias=False), "b": nn.Linear(512, 128, bias=False)}
    orig = dict(zip(lins, ws))
    err = bound.apply_ecsq(lins, orig, c)
    assert err == pytest.approx(c / math.sqrt(12), rel=0.05)   # uniform rounding noise
    slb = bound.apply_slb(lins, orig, {"a": 1.0, "b": 1.0}, 4.0)
    assert slb == pytest.approx(2 ** -4.0, rel=0.05)           # D = sigma^2 2^(-2R)
    assert slb < err                                           # the bound beats ECSQ (by ~0.25 bit)
