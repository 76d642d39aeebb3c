"""Byte-budget export (acip/export/budget.py) on the tiny Llama: never above the budget, within 3%,
monotone, a clear error below the minimum, the cost model cached and reused, the CLI options."""
from __future__ import annotations

import json
import time

import pytest
import torch

import acip
from acip.export import budget as B
from acip.quant.module import EntQuantLinear

from conftest import tiny_model

LAMS = (0.0, 3.9, 58.0)  # fewer rates than the default keeps the cost model quick here


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved ACIPModel directory of the tiny Llama with its singular-value score map."""
    torch.manual_seed(0)
    base = tiny_model("llama")
    pm = acip.parametrize(base)
    pm.score_map = acip.ScoreMap.from_singular_values(pm)
    d = tmp_path_factory.mktemp("budget_run")
    pm.save_pretrained(d)
    return d, tiny_model("llama")


@pytest.fixture(autouse=True)
def _few_lams(monkeypatch):
    monkeypatch.setattr(B, "DEFAULT_LAMS", LAMS)


def _saved_target_bytes(model, tmp_path) -> tuple[int, int]:
    """Target-layer bytes counted from the saved safetensors (+ the sha256 each coded weight keeps)."""
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    names = list(model.config.acip_export["budget"]["layers"])
    prefixes = tuple(n + "." for n in names)
    total = 0
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if k.startswith(prefixes):
                    t = fh.get_tensor(k)
                    total += t.numel() * t.element_size()
    coded = sum(isinstance(m, EntQuantLinear) for m in model.modules())
    return total + 32 * coded, len(names)


@pytest.mark.parametrize("bits", [1.5, 3.0, 5.0])
def test_never_above_and_within_3_percent(run_dir, tmp_path, bits):
    d, base = run_dir
    small = acip.export(d, model=base, bits_per_param=bits)
    info = small.config.acip_export["budget"]
    budget = info["budget_bytes"]
    assert budget == round(bits * info["dense_params"] / 8)
    stored, n = _saved_target_bytes(small, tmp_path)
    assert stored == info["stored_bytes"]
    assert 0.97 * budget <= stored <= budget, info["builds"]
    rep = acip.quant.report(small)  # the report's coded bytes are the same count for the coded layers
    coded = {r.name.rsplit(".", 1)[0] if r.name.endswith((".up", ".down")) else r.name for r in rep.rows}
    assert coded <= set(info["layers"])
    again = acip.load(tmp_path)
    x = torch.randint(0, 96, (1, 10))
    torch.testing.assert_close(again(x).logits, small(x).logits)


def test_size_mb_and_per_layer_why(run_dir):
    d, base = run_dir
    small = acip.export(d, model=base, size_mb=0.02)
    info = small.config.acip_export["budget"]
    assert info["budget_bytes"] == 20000 and 0.97 * 20000 <= info["stored_bytes"] <= 20000
    for row in info["layers"].values():
        assert {"rank", "storage", "bytes", "predicted_bytes", "damage", "sensitivity"} <= set(row)
        assert row["storage"] in ("float32",) + tuple(f"entropy:lam={lam:g}" for lam in LAMS)


def test_monotone_and_fast_from_a_cost_model(run_dir):
    d, base = run_dir
    pm = acip.ACIPModel.from_pretrained(d, model=tiny_model("llama"))
    cm = B.cost_model(pm, pm.score_map, lams=LAMS)
    lo, hi = cm.min_bytes(), cm.max_bytes()
    prev = float("inf")
    t0 = time.perf_counter()
    for budget in torch.linspace(lo, hi, 40, dtype=torch.float64).tolist():
        a = B.allocate(cm, budget)
        assert a.total_bytes <= budget + 1e-6
        assert a.total_damage <= prev + 1e-12
        prev = a.total_damage
    assert time.perf_counter() - t0 < 10
    assert B.allocate(cm, hi).total_damage <= B.allocate(cm, lo).total_damage


def test_budget_below_minimum_names_it(run_dir):
    d, base = run_dir
    pm = acip.ACIPModel.from_pretrained(d, model=tiny_model("llama"))
    cm = B.cost_model(pm, pm.score_map, lams=LAMS)
    low = cm.min_bytes()
    with pytest.raises(B.BudgetError) as e:
        acip.export(d, model=base, bits_per_param=0.01)
    msg = str(e.value)
    assert f"{low / B.MB:.4f} MB" in msg and f"{8 * low / cm.dense_params:.3f} bits per target parameter" in msg
    with pytest.raises(TypeError, match="without ratio"):
        acip.export(d, 0.5, model=base, size_mb=1.0)
    with pytest.raises(TypeError, match="needs a size"):
        acip.export(d, model=base)


def test_cost_model_cached_in_run_dir_and_reused(run_dir, monkeypatch):
    d, base = run_dir
    B._MEMO.clear()
    (d / B.COST_FILE).unlink(missing_ok=True)
    calls = []
    real = B._layer_rates
    monkeypatch.setattr(B, "_layer_rates", lambda *a, **k: calls.append(1) or real(*a, **k))
    acip.export(d, model=base, bits_per_param=3.0)
    assert calls and (d / B.COST_FILE).is_file()
    n = len(calls)
    B._MEMO.clear()  # a new process: only the file is left
    t0 = time.perf_counter()
    small = acip.export(d, model=base, bits_per_param=2.0)
    assert len(calls) == n, "the cached cost model must be reused, not measured again"
    assert time.perf_counter() - t0 < 30
    assert small.config.acip_export["budget"]["stored_bytes"] <= small.config.acip_export["budget"]["budget_bytes"]
    acip.export(d, model=base, bits_per_param=4.0)  # in-process memo
    assert len(calls) == n


def test_calibrated_cost_model_weights(run_dir):
    d, base = run_dir
    pm = acip.ACIPModel.from_pretrained(d, model=tiny_model("llama"))
    calib = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    cm = B.cost_model(pm, pm.score_map, lams=LAMS, calib=calib)
    assert cm.meta["calibrated"] and (cm.dense_sens > 0).all()
    assert cm.key != B.cost_model(pm, pm.score_map, lams=LAMS).key


def test_cost_model_file_round_trip(run_dir, tmp_path):
    d, base = run_dir
    pm = acip.ACIPModel.from_pretrained(d, model=tiny_model("llama"))
    cm = B.cost_model(pm, pm.score_map, lams=LAMS)
    cm.save(tmp_path / "c.safetensors")
    back = B.CostModel.load(tmp_path / "c.safetensors")
    assert back.key == cm.key and back.names == cm.names
    assert B.allocate(back, 20000).ranks == B.allocate(cm, 20000).ranks


def test_cli_help_and_parse(capsys):
    from acip.cli.export import _modernise, build_parser

    ap = build_parser()
    text = ap.format_help()
    assert "--size-mb" in text and "--bits-per-param" in text and "--calib-windows" in text
    args = ap.parse_args(["run", "--size-mb", "40"])
    assert args.size_mb == 40 and args.ratio is None
    args = ap.parse_args(_modernise(["run_dir=run", "bits_per_param=3.0"]))
    assert args.bits_per_param == 3.0
    with pytest.raises(SystemExit):
        ap.parse_args(["run", "--ratio", "0.5", "--size-mb", "40"])
    with pytest.raises(SystemExit):
        ap.parse_args(["run", "--size-mb", "-1"])
    json.dumps(vars(args), default=str)


def test_budget_with_uniform_gptq_storage(run_dir, tmp_path):
    """quantize=EntropyQuantConfig(fmt="uniform", rounding="gptq") + calib: the ECSQ layers with GPTQ codes,
    still within the budget, saved and reloaded to the same logits; a wrong quantize= is refused."""
    from acip.quant import EntropyQuantConfig, NF4Config

    d, base = run_dir
    calib = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    q = EntropyQuantConfig(fmt="uniform", rounding="gptq")
    with pytest.raises(ValueError, match="needs calib"):
        acip.export(d, model=base, bits_per_param=3.0, quantize=q)
    with pytest.raises(TypeError, match="NF4Config"):
        acip.export(d, model=base, bits_per_param=3.0, quantize=NF4Config())
    with pytest.raises(ValueError, match="allocation='sensitivity'"):
        acip.export(d, model=base, bits_per_param=3.0, quantize=EntropyQuantConfig(allocation="sensitivity"), calib=calib)
    with pytest.raises(TypeError, match="without ratio="):
        acip.export(d, model=base, ratio=0.5, bits_per_param=3.0)
    small = acip.export(d, model=base, bits_per_param=3.0, quantize=q, calib=calib)
    near = acip.export(d, model=base, bits_per_param=3.0, quantize=EntropyQuantConfig(fmt="uniform"), calib=calib)
    info = small.config.acip_export["budget"]
    assert 0.97 * info["budget_bytes"] <= info["stored_bytes"] <= info["budget_bytes"]
    assert small.config.acip_quant["fmt"] == "uniform" and small.config.acip_quant["rounding"] == "gptq"
    coded = [m for m in small.modules() if isinstance(m, EntQuantLinear)]
    assert coded and all(m.entry["method"] == "ecsq" for m in coded)
    # the same cost model (rates are measured with fmt="uniform" either way): the same first allocation
    assert info["builds"][0]["predicted"] == near.config.acip_export["budget"]["builds"][0]["predicted"]
    small.save_pretrained(tmp_path / "g")
    x = torch.randint(0, 96, (1, 10))
    torch.testing.assert_close(acip.load(tmp_path / "g")(x).logits, small(x).logits)
