"""load_base/load errors, KJV split, perplexity."""
import math

import pytest
import torch

import acip
from acip.eval import perplexity, token_windows


def test_unknown_builtin_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in model 'smollm3'.*smollm2-135m"):
        acip.load_base("smollm3")
    with pytest.raises(FileNotFoundError, match="no model file"):
        acip.load_base(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        acip.load_base(str(tmp_path))


def test_hub_id_without_network_says_pass_a_local_path():
    with pytest.raises(OSError, match="local directory"):
        acip.load_base("some-org/some-model-that-is-not-cached")


def test_model_object_passes_through(tiny_llama):
    model, tok = acip.load_base(tiny_llama, tokenizer="tok")
    assert model is tiny_llama and tok == "tok" and model.acip_source["kind"] == "object"


def test_load_rejects_plain_checkpoints(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an acip export"):
        acip.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        acip.load(tmp_path / "missing")


def test_load_adapter_dir_rebuilds_parametrized_model(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "base")
    model, _ = acip.load_base(str(tmp_path / "base"))
    pm = acip.parametrize(model)
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.mask[::3] = -1
    pm.save_pretrained(tmp_path / "ad")
    again = acip.load(tmp_path / "ad")
    assert isinstance(again, acip.ACIPModel) and again.active_ranks() == pm.active_ranks()
    assert again.acip_config.source.model == str((tmp_path / "base").resolve())


def test_kjv_split():
    train, held = acip.data.kjv_split()
    verses = acip.data.kjv_verses()
    assert len(verses) > 31000 and len(train) + len(held) == len(verses)
    assert len(train) == int(0.9 * len(verses))
    assert verses[0].startswith("In the beginning God created")
    assert held[-1] == verses[-1] and train[-1] == verses[len(train) - 1]
    with pytest.raises(ValueError, match="train_fraction"):
        acip.data.kjv_split(1.0)


class _CharTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 96 for c in text]}


def test_perplexity_matches_manual(tiny_llama):
    texts = ["In the beginning", "God created the heaven and the earth."] * 20
    win = token_windows(_CharTok(), texts, seq_len=16, max_windows=5)
    assert win.shape == (5, 16)
    logits = tiny_llama(input_ids=win).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), win[:, 1:].reshape(-1))
    assert perplexity(tiny_llama, None, win, batch_size=2) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert perplexity(tiny_llama, _CharTok(), texts, seq_len=16, max_windows=5) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(_CharTok(), ["short"], seq_len=64)
