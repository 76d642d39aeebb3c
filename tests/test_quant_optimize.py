"""Scale optimisation: the search is the exact optimum, LBFGS near it, the one-sweep rate estimate, lam sets
the rate, fallbacks, config errors."""
from __future__ import annotations

import pytest
import torch

import acip.quant.optimize as opt
from acip.quant import EntropyQuantConfig, OutlierError, absmax8, quantize_weight, resolve_config
from acip.quant.formats import code_values, get_format


def _weight(kind: str, shape: tuple[int, int] = (192, 160), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(shape, generator=g) * 0.02
    u = torch.rand(shape, generator=g) - 0.5  # Laplace by inverse CDF
    return -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())


def _exhaustive(W: torch.Tensor, lam: float, fmt_name: str) -> float:
    """The exact optimum over integer exponents (the objective is separable over rows)."""
    fmt = get_format(fmt_name)
    norm = W.abs().sum()
    t0 = torch.ceil(torch.log2(W.abs().amax(1) / fmt.q_max))
    best = None
    for d in range(-3, 30):
        s = torch.exp2(t0 + d)[:, None]
        q = fmt.cast((W / s).clamp(-fmt.q_max, fmt.q_max))
        rows = (W - q * s).abs().sum(1) / norm + lam * q.abs().sum(1) / (W.numel() * fmt.unit)
        best = rows if best is None else torch.minimum(best, rows)
    return float(best.sum())


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
@pytest.mark.parametrize("kind", ["gauss", "laplace"])
@pytest.mark.parametrize("lam", [3.9, 58.0])
def test_lbfgs_within_3_percent_of_exact_optimum(fmt: str, kind: str, lam: float) -> None:
    W = _weight(kind)
    res = quantize_weight(W, EntropyQuantConfig(lam=lam, fmt=fmt, solver="lbfgs"))
    assert res.method == "entquant" and res.scales.dtype == torch.int8
    got = float(opt._loss(W, res.scales.float(), get_format(fmt), lam, W.abs().sum()))
    assert got <= 1.03 * _exhaustive(W, lam, fmt)
    assert res.iterations <= 500


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
@pytest.mark.parametrize("kind", ["gauss", "laplace"])
@pytest.mark.parametrize("lam", [0.0, 3.9, 58.0, 120.0])
def test_search_is_the_exact_optimum(fmt: str, kind: str, lam: float) -> None:
    """The default solver reaches the exhaustive search's loss (to float rounding) and never loses to LBFGS."""
    W = _weight(kind)
    res = quantize_weight(W, EntropyQuantConfig(lam=lam, fmt=fmt))
    assert res.method == "entquant" and res.scales.dtype == torch.int8
    norm = W.abs().sum()
    got = float(opt._loss(W, res.scales.float(), get_format(fmt), lam, norm))
    assert got == pytest.approx(_exhaustive(W, lam, fmt), rel=1e-5)
    lb = quantize_weight(W, EntropyQuantConfig(lam=lam, fmt=fmt, solver="lbfgs"))
    assert got <= float(opt._loss(W, lb.scales.float(), get_format(fmt), lam, norm)) * (1 + 1e-6)


def test_one_sweep_rates_match_the_quantizer() -> None:
    """measure_rates on all rows gives the quantizer's own error and (up to the coder's streams) its bits."""
    from acip.quant.codec import encode_codes

    W = _weight("laplace", (96, 200), seed=3)
    lams = [0.0, 3.9, 14.5, 58.0]
    got = opt.measure_rates(W, lams, rows=10_000)
    for i, lam in enumerate(lams):
        res = quantize_weight(W, EntropyQuantConfig(lam=lam))
        eps = float((W - res.dequantize()).pow(2).sum() / W.pow(2).sum())
        assert got["eps"][i] == pytest.approx(eps, rel=1e-4)
        coded = 8 * encode_codes(res.codes, 262144, "torch").nbytes / W.numel()
        bits, fixed = opt.coded_size(res.codes)
        assert got["bits"][i] == pytest.approx(bits, rel=1e-9) and got["fixed"][i] == fixed
        assert abs(bits + 8 * fixed / W.numel() - coded) < 0.03 * coded
    sub = opt.measure_rates(W, lams, rows=48, seed=1)  # a subset of rows: close to the whole matrix
    assert all(abs(a - b) < 0.15 * b for a, b in zip(sub["bits"], got["bits"]))


def test_lam_sets_the_rate() -> None:
    """Larger lam, fewer bits and more error; the documented calibration of lam holds."""
    W = _weight("gauss", (256, 256), seed=1)
    rs = [quantize_weight(W, EntropyQuantConfig(lam=lam)) for lam in (0.0, 3.9, 14.5, 58.0)]
    ent = [r.entropy for r in rs]
    err = [r.rel_error for r in rs]
    assert ent == sorted(ent, reverse=True) and err == sorted(err)
    assert ent[0] > 6.0 and err[0] < 0.03  # lam=0: plain fp8, ~6.5 bits
    assert 3.5 < ent[1] < 4.6 and 2.0 < ent[3] < 3.0


def test_dequantize_is_codes_times_power_of_two() -> None:
    W = _weight("laplace", (32, 48))
    res = quantize_weight(W, EntropyQuantConfig(lam=14.5))
    vals = code_values("e4m3")[res.codes.long()]
    assert torch.equal(res.dequantize(), vals * torch.ldexp(torch.ones(32), res.scales.int())[:, None])
    assert float((W - res.dequantize()).abs().sum() / W.abs().sum()) == pytest.approx(res.rel_error, rel=1e-5)


def test_nan_retries_with_half_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    real = opt._lbfgs

    def flaky(W, t0, fmt, cfg, lr):  # noqa: ANN001, ANN202
        seen.append(lr)
        if len(seen) < 3:
            return None, float("nan"), 5
        return real(W, t0, fmt, cfg, lr)

    monkeypatch.setattr(opt, "_lbfgs", flaky)
    res = quantize_weight(_weight("gauss", (16, 64)), EntropyQuantConfig(lam=14.5, lr=1.0, solver="lbfgs"))
    assert seen == [1.0, 0.5, 0.25]
    assert res.method == "entquant" and res.retries == 2


def test_persistent_nan_falls_back_to_absmax8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opt, "_lbfgs", lambda *a: (None, float("nan"), 5))
    res = quantize_weight(_weight("gauss", (16, 64)), EntropyQuantConfig(max_retries=2, solver="lbfgs"))
    assert res.method == "absmax8" and "NaN 3 times" in res.reason


def test_extreme_outliers_fall_back_and_say_why() -> None:
    W = _weight("gauss", (8, 64))
    W[3, 5] = 1e5  # 2**22 times the typical entry: beyond float8's dynamic range
    res = quantize_weight(W, EntropyQuantConfig(), name="blk.0.attn")
    assert res.method == "absmax8" and "dynamic range" in res.reason
    assert res.rel_error < 0.02 or res.dequantize()[3, 5] == pytest.approx(1e5, rel=1e-3)
    with pytest.raises(OutlierError, match="blk.0.attn"):
        quantize_weight(W, EntropyQuantConfig(fallback="raise"), name="blk.0.attn")
    assert quantize_weight(W, EntropyQuantConfig(fallback="keep")) is None


def test_absmax8_error_is_small() -> None:
    W = _weight("gauss", (64, 64))
    res = absmax8(W)
    assert res.scales.dtype == torch.int32 and res.rel_error < 0.01  # fp32 bits, dtype-proof
    assert torch.equal(res.scales.view(torch.float32), W.abs().amax(1) / 127)


def test_non_finite_weight_is_rejected() -> None:
    W = _weight("gauss", (4, 4))
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer.7.*NaN or inf"):
        quantize_weight(W, EntropyQuantConfig(), name="layer.7")


def test_config_validation_names_value_and_fix() -> None:
    with pytest.raises(ValueError, match=r"lam.*-1.0.*lam >= 0"):
        EntropyQuantConfig(lam=-1.0)
    with pytest.raises(ValueError, match=r"fmt='fp4'.*'e4m3'"):
        EntropyQuantConfig(fmt="fp4")
    with pytest.raises(ValueError, match="lr"):
        EntropyQuantConfig(lr=0)
    with pytest.raises(TypeError, match="max_iter"):
        EntropyQuantConfig(max_iter=2.5)
    with pytest.raises(ValueError, match="fallback"):
        EntropyQuantConfig(fallback="fp16")
    with pytest.raises(ValueError, match="solver.*'search'"):
        EntropyQuantConfig(solver="adam")
    with pytest.raises(TypeError, match="unknown fields"):
        resolve_config({"lam": 1.0, "lamda": 2.0})


def test_config_from_plain_dict_and_strings() -> None:
    d = {"lam": "14.5", "fmt": "INT8", "max_iter": 100, "target_modules": ["q_proj", "v_proj"]}
    cfg = EntropyQuantConfig(**d)
    assert cfg.lam == 14.5 and cfg.fmt == "int8" and cfg.target_modules == ("q_proj", "v_proj")
    assert resolve_config("entropy") == resolve_config("ENTQUANT") == resolve_config(None) == EntropyQuantConfig()
    assert resolve_config(cfg.to_dict()) == cfg
