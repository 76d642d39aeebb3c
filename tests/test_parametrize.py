"""parametrize(): the matrix of model families, behaviour of the wrapper, bad input."""
import copy

import pytest
import torch
from conftest import tiny_model

import acip
from acip.core import NoTargetLayersError, SVDLinear

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi3", "opt", "bert", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_unchanged_and_targets(family, tokens):
    model = tiny_model(family)
    ref = model(input_ids=tokens).logits
    pm = acip.parametrize(model)
    out = pm(input_ids=tokens).logits
    assert ((out - ref).norm() / ref.norm()) <= 1e-5
    layers = pm.svd_layers()
    assert len(layers) > 0 and all(isinstance(l, SVDLinear) for l in layers.values())
    out_emb = model.get_output_embeddings()
    assert not isinstance(out_emb, SVDLinear)
    assert all("embed" not in n and "wte" not in n for n in layers)
    # only the masks train
    assert {id(p) for p in pm.trainable_parameters()} == {id(m) for m in pm.masks().values()}
    assert pm.size_ratio() == pytest.approx(1.0)


def test_wrapper_behaves_like_model(tiny_llama, tokens):
    ref_loss = tiny_llama(input_ids=tokens, labels=tokens).loss
    ref_gen = tiny_llama.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    pm = acip.parametrize(tiny_llama)
    assert torch.allclose(pm(input_ids=tokens, labels=tokens).loss, ref_loss, atol=1e-5)
    assert torch.equal(pm.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False), ref_gen)
    assert pm.config is tiny_llama.config


def test_frozen_except_masks_and_lora(tiny_llama, tokens):
    pm = acip.parametrize(tiny_llama, lora={"r": 4, "lora_alpha": 8})
    n_layers = len(pm.svd_layers())
    assert len(pm.mask_parameters()) == n_layers and len(pm.lora_parameters()) == 2 * n_layers
    trainable = {id(p) for p in pm.trainable_parameters()}
    assert trainable == {id(p) for p in pm.mask_parameters() + pm.lora_parameters()}
    frozen = {n: p.clone() for n, p in pm.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        pm(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in pm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_size_ratio_follows_masks(tiny_llama):
    pm = acip.parametrize(tiny_llama)
    layers = pm.svd_layers()
    with torch.no_grad():
        for l in layers.values():
            l.mask[l.max_rank // 4:] = -1
    expect = sum(l.cost(l.max_rank // 4) for l in layers.values()) / sum(l.dense_cost() for l in layers.values())
    assert pm.size_ratio() == pytest.approx(expect)
    assert expect < pm.size_ratio(full=True) < 1.0


def test_full_size_ratio_counts_every_other_parameter_once_and_pinned_sizes_survive_sharding(tiny_llama):
    pm = acip.parametrize(tiny_llama, lora={"r": 2, "lora_alpha": 4})
    layers = pm.svd_layers()
    with torch.no_grad():
        for l in layers.values():
            l.mask[l.max_rank // 2:] = -1
    own = {id(p) for l in layers.values() for p in l.parameters()}
    rest = sum(p.numel() for p in {id(p): p for p in tiny_llama.parameters()}.values() if id(p) not in own)
    assert rest > 0 and pm.other_numel() == rest  # embeddings, norms, head: tied weights once, no mask or LoRA
    now = sum(l.cost(l.max_rank // 2) for l in layers.values())
    dense = sum(l.dense_cost() for l in layers.values())
    ratio = (rest + now) / (rest + dense)
    assert pm.size_ratio(full=True) == pytest.approx(ratio, rel=1e-12)
    # what FSDP (use_orig_params=True) leaves one rank: the same parameter objects, each a 1-D piece of itself
    pm.pin_numels()
    twin = copy.deepcopy(pm)  # the record follows the copy's own parameters
    for model in (pm, twin):
        for p in model.model.parameters():
            if id(p) not in {id(q) for l in model.svd_layers().values() for q in l.parameters()}:
                p.data = p.data.reshape(-1)[: p.numel() // 2]
    assert pm.size_ratio(full=True) == twin.size_ratio(full=True) == pytest.approx(ratio, rel=1e-12)
    unpinned = copy.deepcopy(twin)
    unpinned._pinned_numels = []
    assert unpinned.other_numel() < rest  # counted as is: half of each tensor
    # a parameter that did not exist when the sizes were pinned counts as it is (the tiny Llama ties its head
    # to the embedding: untying it adds the new head, the embedding keeps its pinned size)
    assert pm.model.lm_head.weight is pm.model.model.embed_tokens.weight
    pm.model.lm_head.weight = torch.nn.Parameter(torch.zeros(3, 5), requires_grad=False)
    assert pm.other_numel() == rest + 15


def test_target_and_exclude(tiny_llama):
    pm = acip.parametrize(copy.deepcopy(tiny_llama), target_modules=["q_proj", "v_proj"])
    assert sorted({n.rsplit(".", 1)[1] for n in pm.svd_layers()}) == ["q_proj", "v_proj"]
    pm = acip.parametrize(copy.deepcopy(tiny_llama), exclude_modules=r".*layers\.0\..*")
    assert all(".layers.1." in n for n in pm.svd_layers())


def test_no_target_layers_error(tiny_llama):
    with pytest.raises(NoTargetLayersError, match="q_prj"):
        acip.parametrize(tiny_llama, target_modules=["q_prj"])


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="mask_scaling"):
        acip.parametrize(tiny_llama, mask_scaling=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        acip.parametrize("llama")
    with pytest.raises(TypeError, match="not nn.Linear"):
        acip.parametrize(tiny_llama, target_modules=["embed_tokens"])
    pm = acip.parametrize(tiny_llama)
    with pytest.raises(TypeError, match="already parametrized"):
        acip.parametrize(pm)


def test_prune_unprune_is_reversible(tiny_llama, tokens):
    ref = tiny_llama(input_ids=tokens).logits
    pm = acip.parametrize(tiny_llama)
    masks = {n: m.clone() for n, m in pm.masks().items()}
    ranks = pm.prune(0.5)
    assert pm.size_ratio() <= 0.5
    assert pm.active_ranks() == ranks
    assert not torch.allclose(pm(input_ids=tokens).logits, ref, atol=1e-3)
    pm.unprune()
    assert torch.allclose(pm(input_ids=tokens).logits, ref, atol=1e-5)
    assert all(torch.equal(m, masks[n]) for n, m in pm.masks().items())


def test_adapters_roundtrip(tiny_llama, tmp_path, tokens):
    base = copy.deepcopy(tiny_llama)
    pm = acip.parametrize(tiny_llama, lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.mask.uniform_(-0.02, 0.02)
            l.lora_B.normal_()
    pm.save_pretrained(tmp_path / "ad")
    pm2 = acip.ACIPModel.from_pretrained(tmp_path / "ad", model=base)
    assert pm2.acip_config == pm.acip_config and pm2.score_map is None
    assert torch.allclose(pm(input_ids=tokens).logits, pm2(input_ids=tokens).logits, atol=1e-6)


def test_dense_view_is_the_uncompressed_model_without_gradient(tiny_llama, tokens):
    """The teacher of distillation: inside dense_view() the parametrized model computes the base model,
    whatever its masks, pruning and adapters; outside it, the student is unchanged."""
    import copy

    ref = copy.deepcopy(tiny_llama)(input_ids=tokens).logits
    pm = acip.parametrize(tiny_llama, lora={"r": 2})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.mask[::2] = -1
            l.lora_B.normal_()
    student = pm(input_ids=tokens).logits
    with pm.dense_view():
        teacher = pm(input_ids=tokens).logits
    assert torch.allclose(teacher, ref, atol=1e-5) and not teacher.requires_grad
    assert not torch.allclose(student, ref, atol=1e-2)
    assert torch.equal(pm(input_ids=tokens).logits, student)
