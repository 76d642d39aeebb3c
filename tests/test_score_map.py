"""ScoreMap: update rule, exact monotone allocation, persistence, bad input."""
import itertools
import os
import warnings

import pytest
import torch

import acip
from acip.core import ScoreMap, ScoreMapError
from acip.core.svd_linear import rank_cost


def _map(seed=0, shapes=((12, 8), (8, 8), (20, 6)), ties=False):
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(len(shapes))]
    scores = {}
    for n, (o, i) in zip(names, shapes):
        s = torch.rand(min(o, i), generator=g)
        scores[n] = (s * 4).round() / 4 if ties else s
    return ScoreMap(scores, dict(zip(names, shapes)), {n: n == "l0" for n in names}, method="test")


def _brute_force(sm, ratio):
    """Walk the global order entry by entry; stop before the first entry that does not fit."""
    names = sm.names
    entries = [(-float(s), li, j) for li, n in enumerate(names) for j, s in enumerate(sm.scores[n])]
    entries.sort()
    dense = sum(o * i + (o if sm.biases[n] else 0) for n, (o, i) in sm.shapes.items())
    ranks = dict.fromkeys(names, 0)
    def cost(r):
        return sum(rank_cost(r[n], sm.shapes[n][1], sm.shapes[n][0], sm.biases[n]) for n in names)
    n_fit = 0
    for _, li, _ in entries:
        ranks[names[li]] += 1
        if cost(ranks) > ratio * dense:
            ranks[names[li]] -= 1
            break
        n_fit += 1
    for n in names:  # dense-stored layers (past break-even) keep all their directions for free
        o, i = sm.shapes[n]
        if ranks[n] * (i + o) > i * o:
            ranks[n] = min(o, i)
    return ranks


@pytest.mark.parametrize("ties", [False, True])
def test_ranks_exact_against_brute_force(ties):
    sm = _map(ties=ties)
    for ratio in [0.05, 0.2, 0.37, 0.5, 0.73, 0.9, 1.0]:
        assert sm.ranks_for(ratio) == _brute_force(sm, ratio), ratio


def test_ranks_monotone_and_within_one_step():
    sm = _map(seed=3, shapes=((64, 32), (32, 32), (96, 32), (32, 96)))
    alloc = sm.allocator()
    prev = None
    for ratio in torch.linspace(0.01, 1.0, 60).tolist():
        ranks = sm.ranks_for(ratio)
        if prev is not None:
            assert all(ranks[n] >= prev[n] for n in ranks)
        prev = ranks
        n = alloc.prefix_length(ratio)
        assert alloc.cost_of(n) <= ratio * alloc.dense_cost
        if n < alloc.cum_cost.numel():  # the next entry would not fit
            assert alloc.cost_of(n + 1) > ratio * alloc.dense_cost
    assert sm.ranks_for(1.0) == {n: min(sm.shapes[n]) for n in sm.names}


def test_tie_break_is_deterministic():
    scores = {"a": torch.ones(8), "b": torch.ones(8)}
    sm = ScoreMap(scores, {"a": (8, 8), "b": (8, 8)}, {"a": False, "b": False}, method="t")
    # 8x8 layers: rank r costs 16r. ratio 0.25 = 32 params = 2 entries; the tie goes to layer order
    assert sm.ranks_for(0.25) == {"a": 2, "b": 0}
    # at ratio 0.5 (64 params) layer a reaches rank 4 = its dense cost; ranks 5..8 then cost nothing
    assert sm.ranks_for(0.5) == {"a": 8, "b": 0}
    assert sm.keep_indices({"a": 2, "b": 0})["a"].tolist() == [0, 1]


def test_dense_stored_layers_keep_every_direction():
    # 8x8 layers: rank r costs 16r up to 64 = dense. Layer a's last three directions score below
    # all of b's, so the prefix at ratio 0.7 (89.6 params) holds a0..a4 (64, a past break-even)
    # and b0 (16). Stored dense, a keeps all 8 directions at the same cost.
    scores = {"a": torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.01, 0.02, 0.03]),
              "b": torch.linspace(0.5, 0.1, 8)}
    sm = ScoreMap(scores, {"a": (8, 8), "b": (8, 8)}, {"a": False, "b": False}, method="t")
    alloc = sm.allocator()
    assert alloc.prefix_ranks(0.7) == {"a": 5, "b": 1}
    assert sm.ranks_for(0.7) == {"a": 8, "b": 1}
    assert sm.ranks_for(0.45) == alloc.prefix_ranks(0.45) == {"a": 3, "b": 0}  # below break-even


def test_update_rule_by_hand():
    sm = ScoreMap({"l": torch.zeros(4)}, {"l": (4, 4)}, {"l": False}, method="acip")
    sm.update({"l": torch.tensor([0.3, 0.2, 0.1, -0.1])})
    assert sm.scores["l"].tolist() == pytest.approx([0.3, 0.2, 0.1, -1.0])
    sm.update({"l": torch.tensor([0.25, -0.01, 0.05, -0.2])})  # entry 1 just pruned
    assert sm.scores["l"].tolist() == pytest.approx([0.25, -1.0, 0.05, -2.0])
    sm.update({"l": torch.tensor([0.2, -0.02, -0.01, -0.3])})  # entry 2 just pruned
    assert sm.scores["l"].tolist() == pytest.approx([0.2, -2.0, -1.0, -3.0])
    # pruning order recorded: 3 first, then 1, then 2; 0 is still active
    assert torch.argsort(sm.scores["l"], descending=True).tolist() == [0, 2, 1, 3]


def test_singular_value_baseline_normalisation(tiny_llama):
    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    for n, l in pm.svd_layers().items():
        s = sm.scores[n]
        assert s.norm() == pytest.approx(1.0, abs=1e-5)
        assert torch.all(s[:-1] >= s[1:])
        w = l.ortho.double() * l.mask_scaling @ l.base.double()
        assert s[0] == pytest.approx(float(torch.linalg.matrix_norm(w, 2) / w.norm()), rel=1e-4)


def test_save_load_roundtrip_and_atomic(tmp_path, tiny_llama):
    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_masks(pm)
    sm.stop_ratio = 0.4
    path = sm.save(tmp_path / "run" / "score_map.safetensors")
    assert sorted(os.listdir(path.parent)) == ["score_map.safetensors"]  # no temp files left
    again = ScoreMap.load(path.parent)
    assert again.names == sm.names and again.stop_ratio == 0.4 and again.method == "acip"
    assert all(torch.equal(again.scores[n], sm.scores[n]) for n in sm.names)
    assert again.config == pm.acip_config and list(again.config.layers) == sm.names
    before = path.read_bytes()

    class Boom(Exception):
        pass

    def fail(tmp):
        open(tmp, "wb").write(b"partial")
        raise Boom

    from acip.core.io import atomic_write
    with pytest.raises(Boom):
        atomic_write(path, fail)
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["score_map.safetensors"]


def test_load_errors(tmp_path):
    sm = _map()
    path = sm.save(tmp_path / "sm.safetensors")
    with pytest.raises(FileNotFoundError, match="no score map"):
        ScoreMap.load(tmp_path / "missing.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScoreMapError, match="truncated"):
        ScoreMap.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ScoreMapError, match="truncated"):
        ScoreMap.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ScoreMapError, match="not an acip score map"):
        ScoreMap.load(tmp_path / "other.safetensors")


def test_bad_ratio_and_stop_ratio_warning():
    sm = _map()
    for bad in [0, -0.1, 1.5, float("nan"), "half"]:
        with pytest.raises(ValueError, match="ratio"):
            sm.ranks_for(bad)
    sm.stop_ratio = 0.5
    with pytest.warns(UserWarning, match="below the stop ratio 0.5"):
        sm.ranks_for(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sm.ranks_for(0.6)


def test_mismatched_model_lists_names(tiny_llama):
    from conftest import tiny_model

    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    other = acip.parametrize(tiny_model("phi3"))  # fused qkv_proj: other names
    with pytest.raises(ScoreMapError, match="does not match the model") as e:
        sm.check_compatible(other)
    assert "model.layers.0.self_attn.q_proj" in str(e.value)
    first = sm.names[0]
    shapes = dict(sm.shapes, **{first: (sm.shapes[first][0] + 1, sm.shapes[first][1])})
    wider = ScoreMap(sm.scores, shapes, sm.biases, method="x")  # same names, one shape differs
    with pytest.raises(ScoreMapError, match="shape"):
        wider.check_compatible(pm)


def test_allocation_scales_to_7b_shapes():
    # one entry per singular direction of a 7B Llama: 32 blocks x 7 layers, 917,504 directions
    shapes = []
    for _ in range(32):
        shapes += [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    g = torch.Generator().manual_seed(0)
    names = [f"l{i}" for i in range(len(shapes))]
    sm = ScoreMap({n: torch.rand(4096, generator=g) for n in names}, dict(zip(names, shapes)),
                  dict.fromkeys(names, False), method="synthetic")
    r4, r6 = sm.ranks_for(0.4), sm.ranks_for(0.6)
    assert all(r4[n] <= r6[n] for n in names)
    assert sum(rank_cost(r, i, o) for (o, i), r in zip(shapes, r6.values())) <= 0.6 * sum(o * i for o, i in shapes)
