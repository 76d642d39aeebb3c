"""Parametrize and export hold one model at a time: old layers freed, mmap'd pages released safely."""
from __future__ import annotations

import importlib
import sys
import weakref

import pytest
import torch

import acip
from acip.core.parametrize import parametrize
from acip.core.surgery import find_targets

from conftest import tiny_config, tiny_model

pmod = importlib.import_module("acip.core.parametrize")  # the module (acip.core.parametrize is the function)


def test_old_layers_are_freed_without_gc(tiny_llama):
    names = find_targets(tiny_llama, "all-linear", None)
    refs = [weakref.ref(tiny_llama.get_submodule(n)) for n in names]
    wrefs = [weakref.ref(tiny_llama.get_submodule(n).weight) for n in names]
    pm = parametrize(tiny_llama)
    assert len(pm.svd_layers()) == len(names)
    assert all(r() is None for r in refs), "a dense layer outlived parametrize"
    assert all(r() is None for r in wrefs), "a dense weight outlived parametrize"


def _saved_model(tmp_path, hidden=128):
    import transformers as tf

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = hidden, 2 * hidden
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _load(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")
def test_mmap_loaded_model_parametrizes_exactly_and_pages_are_released(tmp_path, tokens, monkeypatch):
    path = _saved_model(tmp_path)
    ref_model = _load(path)
    model = _load(path)
    emb = model.get_input_embeddings().weight
    emb_before = emb.detach().clone()
    seen = []
    real = pmod._HostRelease.close

    def spy(self):
        seen.append(self.released)
        real(self)

    monkeypatch.setattr(pmod._HostRelease, "close", spy)
    pm = parametrize(model, svd_dtype="float64")
    assert seen and seen[0] > 0, "no page of a dead memory-mapped weight was released"
    assert torch.equal(emb, emb_before)  # neighbours of released pages are intact
    ref = parametrize(ref_model, svd_dtype="float64")
    for n, l in pm.svd_layers().items():
        r = ref.svd_layers()[n]
        assert torch.equal(l.ortho, r.ortho) and torch.equal(l.base, r.base), n
    assert torch.equal(pm(input_ids=tokens).logits, ref(input_ids=tokens).logits)
    dense = _load(path)
    assert torch.allclose(pm(input_ids=tokens).logits, dense(input_ids=tokens).logits, atol=1e-4)


def test_a_weight_the_caller_holds_stays_intact(tmp_path):
    path = _saved_model(tmp_path)
    model = _load(path)
    name = find_targets(model, "all-linear", None)[0]
    held = model.get_submodule(name).weight
    copy = held.detach().clone()
    parametrize(model)
    assert torch.equal(held, copy)


def test_export_copies_tied_tensors_once_and_stays_independent(tokens):
    pm = parametrize(tiny_model("llama"))
    e = acip.export(pm, 0.5, score_map=acip.ScoreMap.from_singular_values(pm))
    assert e.get_output_embeddings().weight is e.get_input_embeddings().weight
    src = {t.untyped_storage().data_ptr() for t in list(pm.parameters()) + list(pm.buffers())}
    assert not src & {t.untyped_storage().data_ptr() for t in list(e.parameters()) + list(e.buffers())}
    assert not any(t.is_meta for t in list(e.parameters()) + list(e.buffers()))
    before = pm(input_ids=tokens).logits
    with torch.no_grad():
        e.get_input_embeddings().weight.zero_()
    assert torch.equal(pm(input_ids=tokens).logits, before)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "opt"])
def test_export_of_other_families_builds_every_tensor(family, tokens):
    pm = parametrize(tiny_model(family))
    e = acip.export(pm, 0.7, score_map=acip.ScoreMap.from_singular_values(pm))
    assert not any(t.is_meta for t in list(e.parameters()) + list(e.buffers()))
    assert torch.isfinite(e(input_ids=tokens).logits).all()
