"""export(): measured sizes, exactness, save/load, LoRA folding, source untouched, rebuild from file."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import acip
from acip.core import LowRankLinear, ScoreMap, ScoreMapError
from acip.core.svd_linear import rank_cost


def _file_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_ratio_is_exact_and_roundtrips(family, tokens, tmp_path):
    model = tiny_model(family)
    ref = model(input_ids=tokens).logits
    pm = acip.parametrize(model)
    sm = ScoreMap.from_singular_values(pm)
    full = acip.export(pm, 1.0, score_map=sm)
    assert torch.allclose(full(input_ids=tokens).logits, ref, atol=1e-5)
    full.save_pretrained(tmp_path)
    again = acip.load(tmp_path)
    assert (again(input_ids=tokens).logits - full(input_ids=tokens).logits).abs().max() <= 1e-5


def test_measured_ratio_within_one_step(tiny_llama):
    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    alloc = sm.allocator()
    for ratio in [0.1, 0.33, 0.5, 0.8, 0.95]:
        small = acip.export(pm, ratio, score_map=sm)
        rep = acip.size_report(small)
        assert rep.target_ratio <= ratio
        n = alloc.prefix_length(ratio)
        next_cost = alloc.cost_of(n + 1)  # one more direction would not fit
        assert next_cost > ratio * rep.target_dense_params
        assert rep.target_params == alloc.cost_of(n)
        assert small.config.acip_export["measured_ratio"] == pytest.approx(rep.target_ratio)


def test_export_matches_pruned_model_and_layers_are_lowrank_or_dense(tiny_llama, tokens):
    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    for ratio in [0.3, 0.9]:
        small = acip.export(pm, ratio, score_map=sm)
        ranks = pm.prune(ratio, sm)
        assert torch.allclose(small(input_ids=tokens).logits, pm(input_ids=tokens).logits, atol=1e-5)
        pm.unprune()
        for name, r in ranks.items():
            mod = small.get_submodule(name)
            l = pm.svd_layers()[name]
            if r * (l.in_features + l.out_features) > l.in_features * l.out_features:
                assert isinstance(mod, torch.nn.Linear)
            else:
                assert isinstance(mod, LowRankLinear) and mod.rank == r
            assert sum(p.numel() for p in mod.parameters()) == rank_cost(r, l.in_features, l.out_features, l.bias is not None)


def test_export_never_changes_source(tiny_llama, tokens):
    pm = acip.parametrize(tiny_llama, lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.normal_(std=0.01)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    out_before = pm(input_ids=tokens).logits
    small = acip.export(pm, 0.5, score_map=ScoreMap.from_singular_values(pm))
    small.model.embed_tokens.weight.data.zero_()  # the export owns its tensors
    after = pm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(pm(input_ids=tokens).logits, out_before)


def test_lora_is_folded_in(tiny_llama, tokens):
    pm = acip.parametrize(tiny_llama, lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.normal_(std=0.05)
    sm = ScoreMap.from_singular_values(pm)
    full = acip.export(pm, 1.0, score_map=sm)  # rank k holds W + sBA exactly
    assert torch.allclose(full(input_ids=tokens).logits, pm(input_ids=tokens).logits, atol=1e-4)
    small = acip.export(pm, 0.5, score_map=sm)
    assert acip.size_ratio(small) <= 0.5  # adapters are inside the budget, not on top of it


def test_save_load_and_file_size(tiny_llama, tokens, tmp_path):
    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    sizes = {}
    for ratio in [0.8, 0.4]:
        small = acip.export(pm, ratio, score_map=sm)
        d = tmp_path / str(ratio)
        small.save_pretrained(d)
        sizes[ratio] = (_file_bytes(d), sum(p.numel() for p in small.parameters()))
        for loaded in (acip.load(d), AutoModelForCausalLM.from_pretrained(d)):
            assert (loaded(input_ids=tokens).logits - small(input_ids=tokens).logits).abs().max() <= 1e-5
    # the file shrinks by the removed fp32 parameters (4 bytes each), headers aside
    removed = sizes[0.8][1] - sizes[0.4][1]
    assert removed > 0
    assert sizes[0.8][0] - sizes[0.4][0] == pytest.approx(4 * removed, rel=0.02)


def test_rank_zero_layers_roundtrip(tiny_llama, tokens, tmp_path):
    pm = acip.parametrize(tiny_llama)
    scores = ScoreMap.from_singular_values(pm)
    first = scores.names[0]
    scores.scores[first] -= 10.0  # this layer is dropped first: rank 0 at small ratios
    small = acip.export(pm, 0.3, score_map=scores)
    assert small.get_submodule(first).rank == 0
    small.save_pretrained(tmp_path)
    assert torch.allclose(acip.load(tmp_path)(input_ids=tokens).logits, small(input_ids=tokens).logits, atol=1e-5)


def test_export_from_a_saved_run_directory_in_a_fresh_process(tmp_path, tokens):
    """A saved ACIPModel directory (masks, LoRA, score map) exports in a new process exactly like
    the in-process export; the score map file inside it points export at its directory."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model, _ = acip.load_base(str(base_dir))
    pm = acip.parametrize(model, lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.normal_(std=0.05)
            l.mask[-3:] = -1
    pm.score_map = ScoreMap.from_masks(pm)
    pm.save_pretrained(tmp_path / "run")
    expect = acip.export(pm, 0.6)(input_ids=tokens).logits
    code = (
        "import acip, torch, sys; "
        "m = acip.export(sys.argv[1], 0.6); m2 = acip.load(sys.argv[1].rsplit('/', 1)[0], ratio=0.6); "
        "t = torch.load(sys.argv[2]); torch.save((m(input_ids=t).logits, m2(input_ids=t).logits), sys.argv[3])"
    )
    torch.save(tokens, tmp_path / "tok.pt")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / "score_map.safetensors"), str(tmp_path / "tok.pt"),
                    str(tmp_path / "out.pt")], check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    a, b = torch.load(tmp_path / "out.pt")
    assert torch.allclose(a, expect, atol=1e-5) and torch.allclose(b, expect, atol=1e-5)


def test_export_errors(tiny_llama):
    pm = acip.parametrize(copy.deepcopy(tiny_llama))
    sm = ScoreMap.from_singular_values(pm)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        acip.export(pm, 1.2, score_map=sm)
    with pytest.raises(ValueError, match="ratio"):
        acip.export(pm, 0.0, score_map=sm)
    with pytest.raises((ScoreMapError, ValueError), match="does not match|differ"):
        acip.export(sm, 0.5, model=tiny_model("phi3"))
    with pytest.raises(ValueError, match="ratio must be a number"):
        acip.export(pm, True, score_map=sm)  # ratio=True is not 1.0
    with pytest.raises(ValueError, match="ratio must be a number"):
        acip.export(pm, float("nan"), score_map=sm)
    orphan = ScoreMap(sm.scores, sm.shapes, sm.biases, method="x")  # no source, no model bound
    with pytest.raises(ScoreMapError, match="pass the model"):
        acip.export(orphan, 0.5)
    assert acip.size_ratio(acip.export(orphan, 0.5, model=tiny_llama)) <= 0.5
    with pytest.raises(FileNotFoundError, match="no run or model directory"):
        acip.export("score_map.safetensors", 0.5)
    with pytest.raises(TypeError, match="ScoreMap"):
        acip.export(42, 0.5)


def test_size_report_counts_quantized_factors_as_parameters(tiny_llama):
    from acip.quant import EntropyQuantConfig

    pm = acip.parametrize(tiny_llama)
    sm = ScoreMap.from_singular_values(pm)
    small = acip.export(pm, 0.5, score_map=sm)
    before = acip.size_report(small)
    quantized = acip.export(pm, 0.5, score_map=sm, quantize=EntropyQuantConfig(lam=3.9, max_iter=20))
    after = acip.size_report(quantized)
    assert after.target_params == before.target_params and after.total_params == before.total_params


def test_dense_layers_keep_full_weight_unless_adapted(tiny_llama, tokens):
    """Past break-even a layer is stored dense: untuned layers keep the exact original W, layers
    with a trained adapter keep their truncation (the adapter compensates for the pruned part)."""
    pm = acip.parametrize(tiny_llama, lora={"r": 2, "lora_alpha": 4})
    names = list(pm.svd_layers())
    adapted = set(names[::2])
    with torch.no_grad():
        for n, l in pm.svd_layers().items():
            if n in adapted:
                l.lora_B.normal_(std=0.05)
    assert pm.liftable_layers() == set(names) - adapted
    sm = ScoreMap.from_singular_values(pm)
    alloc = sm.allocator()
    ratio = next(r for r in (0.95, 0.9, 0.85, 0.8)
                 if any(alloc.prefix_ranks(r)[n] < min(sm.shapes[n]) and alloc.prefix_ranks(r)[n] >= int(alloc.dense_from[i])
                        for i, n in enumerate(sm.names) if n not in adapted)
                 and any(alloc.prefix_ranks(r)[n] < min(sm.shapes[n]) and alloc.prefix_ranks(r)[n] >= int(alloc.dense_from[i])
                         for i, n in enumerate(sm.names) if n in adapted))
    prefix = alloc.prefix_ranks(ratio)
    small = acip.export(pm, ratio, score_map=sm)
    lifted = kept = 0
    for i, n in enumerate(sm.names):
        l, k = pm.svd_layers()[n], min(sm.shapes[n])
        if not prefix[n] >= int(alloc.dense_from[i]):
            continue
        w = small.get_submodule(n).weight
        up, down = l.factors(torch.arange(k))
        full = up @ down
        if n in adapted:  # the prefix directions plus the whole adapter, as the trained layer computes
            idx = sm.keep_indices(prefix)[n]
            w_keep = (l.ortho[:, idx] * l.mask_scaling) @ l.base[idx]
            assert torch.allclose(w, w_keep + l.lora_scaling * l.lora_B @ l.lora_A, atol=1e-5)
            assert prefix[n] < torch.linalg.matrix_rank(w.detach().double(), rtol=1e-5) <= prefix[n] + 2 <= k
            kept += 1
        else:  # the original weight, exactly
            assert torch.allclose(w, full, atol=1e-5)
            lifted += 1
    assert lifted and kept
    # prune() keeps the same directions (its forward differs: the adapter is not re-truncated)
    ranks = pm.prune(ratio, sm)
    assert ranks == sm.ranks_for(ratio, lift=pm.liftable_layers()) and ranks != prefix
    assert pm.active_ranks() == ranks
    pm.unprune()


def test_export_without_adapters_is_the_untuned_truncation(tiny_llama, tokens):
    """adapters=False: the same ranks as an adapter-free model (every layer liftable), factors
    without the LoRA term, the source model untouched; a non-bool is refused."""
    pm = acip.parametrize(tiny_llama, lora={"r": 2, "lora_alpha": 4})
    sm = ScoreMap.from_singular_values(pm)
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.normal_(std=0.05)
    with_ad = acip.export(pm, 0.6, score_map=sm)
    without = acip.export(pm, 0.6, score_map=sm, adapters=False)
    assert without.config.acip_export["adapters"] is False and with_ad.config.acip_export["adapters"] is True
    saved = {n: l.lora_B.detach().clone() for n, l in pm.svd_layers().items()}
    with torch.no_grad():  # the reference: the same model with its adapters zeroed
        for l in pm.svd_layers().values():
            l.lora_B.zero_()
    reference = acip.export(pm, 0.6, score_map=sm)
    assert without.config.acip_layout == reference.config.acip_layout
    with torch.no_grad():
        assert torch.allclose(without(tokens).logits, reference(tokens).logits, atol=1e-5)
        assert not torch.allclose(without(tokens).logits, with_ad(tokens).logits, atol=1e-3)
        for n, l in pm.svd_layers().items():
            l.lora_B.copy_(saved[n])
    with pytest.raises(TypeError, match="adapters='no'"):
        acip.export(pm, 0.6, score_map=sm, adapters="no")
