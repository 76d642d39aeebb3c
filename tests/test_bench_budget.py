"""scripts/bench_budget.py's new rows on the tiny Llama: bytes counted from saved files, the ACIP-ratio x
lam grid and its best point under a budget, and the opt-in GPTQ peer (its clear refusals here; the real
step is measured by bench_budget --part gptq, not here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import acip
from acip.quant.module import EntQuantLinear

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_budget as bb  # noqa: E402
import budget_table as bt  # noqa: E402
import gptq_peer  # noqa: E402
from conftest import tiny_model  # noqa: E402


def test_file_bytes_counts_every_tensor_under_the_layers(tmp_path):
    model = tiny_model("llama")
    names = bb.target_names(model)
    model.save_pretrained(tmp_path)
    want = sum(t.numel() * t.element_size() for n in names for t in model.get_submodule(n).parameters())
    assert bb.file_bytes(tmp_path, names) == want
    assert bb.file_bytes(tmp_path, names[:1]) == model.get_submodule(names[0]).weight.numel() * 4
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        bb.file_bytes(tmp_path / "nothing", names)
    with pytest.raises(ValueError, match="names is empty"):
        bb.file_bytes(tmp_path, [])


def _row(method, nbytes, kjv, pydoc):
    return {"method": method, "bytes": nbytes, "bits": nbytes * 8 / 1000, "seconds": 1.0,
            "ppl": {"kjv_heldout": kjv, "pydoc": pydoc}}


ROWS = [_row("fp32", 4000, 10.0, 5.0), _row("bitsandbytes NF4", 520, 12.0, 6.0),
        _row("grid ratio=1 lam=3.9", 500, 11.0, 7.0), _row("grid ratio=0.9 lam=3.9", 450, 11.5, 6.5),
        _row("grid ratio=1 lam=14.5", 380, 20.0, 9.0), _row("grid ratio=0.8 lam=3.9", 400, 13.0, 8.0),
        {"method": "grid ratio=0.7 lam=58", "error": "did not run"}]


def test_grid_best_is_per_domain_and_never_above_the_budget():
    got = bt.grid_best(ROWS, 520)
    assert [(r["method"], r["best_for"]) for r in got] == [("grid ratio=1 lam=3.9", "kjv_heldout"),
                                                           ("grid ratio=0.9 lam=3.9", "pydoc")]
    one = bt.grid_best(ROWS, 499)  # ratio 1 lam 3.9 (500 B) no longer fits: 0.9 is best on both
    assert [(r["method"], r["best_for"]) for r in one] == [("grid ratio=0.9 lam=3.9", "every domain")]
    assert bt.grid_best(ROWS, 379) == []
    with pytest.raises(ValueError, match="positive number of bytes"):
        bt.grid_best(ROWS, 0)


def test_combined_table_names_the_best_grid_point_at_each_budget(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"dense_params": 1000, "rows": ROWS[:2]}))
    b.write_text(json.dumps({"dense_params": 1000, "rows": ROWS[2:]}))
    assert bt.budgets_of(ROWS, 1000, [3.0]) == [("NF4's bytes", 520), ("3 bits/param", 375)]
    text = bt.combined_table([str(a), str(b)], [3.0, 3.96])  # 3.96 bits = 495 B: ratio 1 lam 3.9 (500 B) is out
    lines = text.splitlines()
    assert "| best grid point at NF4's bytes, for kjv_heldout: ratio=1 lam=3.9 | 500 |" in text
    assert "| best grid point at NF4's bytes, for pydoc: ratio=0.9 lam=3.9 | 450 |" in text
    assert any(l.startswith("| best grid point at 3 bits/param (375 B) | did not run: no grid point fits") for l in lines)
    assert "| best grid point at 3.96 bits/param, for every domain: ratio=0.9 lam=3.9 | 450 |" in text
    assert "| grid ratio=0.7 lam=58 | did not run: did not run |" in text
    assert "1.100 / 1.400" in text  # x fp32 of the 500 B point
    with pytest.raises(ValueError, match="dense_params"):
        (tmp_path / "c.json").write_text(json.dumps({"rows": []}))
        bt.combined_table([str(tmp_path / "c.json")], [3.0])


def test_grid_rows_export_then_quantize_each_point():
    torch.manual_seed(0)
    pm = acip.parametrize(tiny_model("llama"))
    pm.score_map = acip.ScoreMap.from_singular_values(pm)
    got = []

    def record(method, model, seconds, nbytes, **extra):
        got.append((method, nbytes, extra["size_ratio"], sum(isinstance(m, EntQuantLinear) for m in model.modules())))

    bb.grid_rows(pm, [1.0, 0.6], [0.0, 58.0], lambda name: name != "grid0.6:0", record)
    assert [g[0] for g in got] == ["grid ratio=1 lam=0", "grid ratio=1 lam=58", "grid ratio=0.6 lam=58"]
    by = {g[0]: g for g in got}
    assert by["grid ratio=1 lam=58"][1] < by["grid ratio=1 lam=0"][1]  # larger lam, fewer bytes
    assert by["grid ratio=0.6 lam=58"][1] < by["grid ratio=1 lam=58"][1]  # lower ratio, fewer bytes
    assert by["grid ratio=0.6 lam=58"][2] <= 0.6 < by["grid ratio=1 lam=58"][2]
    assert all(g[3] > 0 for g in got)  # every point is entropy coded
    with pytest.raises(ValueError, match="at least one ratio"):
        bb.grid_rows(pm, [], [3.9], lambda _n: True, record)
    with pytest.raises(ValueError, match="ratio"):
        bb.grid_rows(pm, [1.5], [3.9], lambda _n: True, record)


def test_gptq_peer_refuses_a_missing_interpreter_or_package(tmp_path):
    with pytest.raises(gptq_peer.GPTQUnavailable, match="not an executable file"):
        gptq_peer.check_python(tmp_path / "no-python")
    if subprocess.run([sys.executable, "-c", "import llmcompressor"], capture_output=True).returncode != 0:
        with pytest.raises(gptq_peer.GPTQUnavailable, match="cannot import llmcompressor"):
            gptq_peer.check_python(sys.executable)
    for bits, group in ((1, 128), (4.0, 128), (4, 0), (True, 128)):
        with pytest.raises(ValueError, match="bits|group"):
            gptq_peer.check_args(bits, group)


def test_bench_budget_part_gptq_fails_fast_with_a_clear_message(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_budget.py"), "--part", "gptq"]
    r = subprocess.run(cmd + ["--gptq-python", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not an executable file" in r.stderr and "scripts/gptq_peer.py" in r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--gptq-python" in r.stderr
