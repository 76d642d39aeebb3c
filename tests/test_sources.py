"""Self-generated data (sampling loop, cache with checksums, determinism) and weighted mixtures."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import acip.train.models as models
from acip.train import sources
from acip.train.sources import _sample, mix, sample_tokens, self_generated

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
MODEL = {"_target_": "acip.train.models.tiny_llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "seed": 0}
SMALL = dict(num_sequences=6, seq_len=12, batch_size=4, prompt_fraction=0.5, prompt_tokens=3, progress=False)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def loads(monkeypatch):
    """Counts how often the model node is built (Hydra resolves _target_ at call time)."""
    calls = []
    real = models.tiny_llama

    def counted(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(models, "tiny_llama", counted)
    return calls


def tiny():
    return instantiate(MODEL)


def test_greedy_loop_matches_full_forwards_with_static_and_dynamic_cache():
    model, _ = tiny()
    prefix = torch.randint(1, 200, (3, 4), generator=torch.Generator().manual_seed(0))
    ref = prefix
    with torch.no_grad():  # no KV cache at all: the whole sequence again for every token
        for _ in range(8):
            ref = torch.cat([ref, model(input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for kv in ("static", "dynamic"):
        assert torch.equal(sample_tokens(model, prefix, 8, temperature=0.0, cache=kv), ref), kv


def test_sampling_is_seeded_and_deterministic():
    model, _ = tiny()
    prefix = torch.ones(4, 1, dtype=torch.long)
    a = sample_tokens(model, prefix, 10, 1.0, 0.9, 0, generator=torch.Generator().manual_seed(3))
    b = sample_tokens(model, prefix, 10, 1.0, 0.9, 0, generator=torch.Generator().manual_seed(3))
    c = sample_tokens(model, prefix, 10, 1.0, 0.9, 0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 11)


def test_nucleus_and_top_k_keep_only_their_candidates(monkeypatch):
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0, -3.0]] * 200)  # p ~ 0.72, 0.26, 0.005, ...
    g = torch.Generator().manual_seed(0)
    assert set(_sample(logits, 1.0, 1.0, 1, g).tolist()) == {0}  # top-k = 1: argmax
    assert set(_sample(logits, 1.0, 0.5, 0, g).tolist()) == {0}  # the nucleus of 0.5 is the first token
    assert set(_sample(logits, 1.0, 0.9, 0, g).tolist()) == {0, 1}
    monkeypatch.setattr(sources, "NUCLEUS_CANDIDATES", 1)  # rows whose nucleus is larger: the full-sort path
    assert set(_sample(logits, 1.0, 0.9, 0, g).tolist()) == {0, 1}
    assert set(_sample(logits, 1.0, 0.9, 2, g).tolist()) <= {0, 1}
    assert set(_sample(logits, 0.0, 0.9, 0, g).tolist()) == {0}  # temperature 0: greedy


def test_generated_once_cached_with_checksum_and_reused(cache, loads):
    train, held = self_generated(MODEL, **SMALL)
    assert len(loads) == 1 and len(train) == 5 and len(held) == 1 and all(isinstance(t, str) for t in train)
    assert train.tokens.shape == (5, 12) and train.teacher_ids.shape == (5, 12, 64)  # the rows behind the texts
    assert list(train) == [tok for tok in sources._decode(models.byte_tokenizer(), train.tokens, torch.ones(5, dtype=torch.long))]
    files = list((cache / "self_generated").glob("*.safetensors"))
    assert len(files) == 1
    again = self_generated(MODEL, **SMALL)
    assert len(loads) == 1, "the second run must read the cache, not load the model"
    assert again == (train, held)
    other = self_generated(MODEL, **{**SMALL, "seed": 1})  # other settings: another cache entry
    assert len(loads) == 2 and other != (train, held)
    fresh = self_generated(MODEL, **SMALL, cache=False)  # deterministic: the same samples without the cache
    assert fresh == (train, held)
    raw = bytearray(files[0].read_bytes())
    raw[-5] ^= 0xFF  # corrupt the stored texts
    files[0].write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged.*sampling it again"):
        assert self_generated(MODEL, **SMALL) == (train, held)  # sampled again, identically
    assert len(loads) == 4  # seed 1, cache=False and the damaged entry each sampled again
    assert self_generated(MODEL, **SMALL) == (train, held) and len(loads) == 4  # the rewritten cache is good


def test_prompts_come_from_the_seed_text(tmp_path):
    seed = tmp_path / "seed.txt"
    seed.write_text("\n\n".join(["zebra crossing number one"] * 30))
    train, held = self_generated(MODEL, **{**SMALL, "prompt_fraction": 1.0, "seed_text": [str(seed)]})
    assert all(t.startswith("zeb") for t in train + held)  # 3 byte tokens of the seed text, then samples


CHAT = "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"


def test_chat_prompts_open_a_user_turn_of_the_models_own_template(monkeypatch):
    real = models.tiny_llama
    toks = []

    def with_template(**kw):
        m, tok = real(**kw)
        tok.chat_template = CHAT
        toks.append(tok)
        return m, tok

    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):  # the byte tokenizer has none
        self_generated(MODEL, **{**SMALL, "prompt_fraction": 1.0, "seed_text": "chat"})
    monkeypatch.setattr(models, "tiny_llama", with_template)
    train, held = self_generated(MODEL, **{**SMALL, "prompt_fraction": 1.0, "seed_text": "chat"})
    opening = sources.chat_prompt(toks[0])
    assert toks[0].decode(opening) == "<|endoftext|>user\n"  # cut where the user's message starts
    rows = torch.cat([train.tokens, held.tokens])
    assert torch.equal(rows[:, :len(opening)], torch.tensor(opening).expand(len(rows), -1))  # no BOS of ours before it
    assert all(t.startswith("<|endoftext|>user\n") for t in train + held)  # special tokens kept in the text
    half, _ = self_generated(MODEL, **{**SMALL, "prompt_fraction": 0.5, "seed_text": "chat"})
    assert sum(t.startswith("<|endoftext|>user") for t in half) in (1, 4)  # one of the two batches (4 + 2 rows)
    assert not all(t.startswith("<|endoftext|>user") for t in half)


@pytest.mark.parametrize("kw, msg", [({"heldout_fraction": 1.0}, "heldout_fraction"), ({"top_p": 0.0}, "top_p"),
                                     ({"prompt_tokens": 12}, "prompt_tokens"), ({"num_sequences": 1}, "num_sequences")])
def test_bad_settings_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        self_generated(MODEL, **{**SMALL, **kw})


def test_mix_weights_by_characters_and_unites_the_held_out_parts():
    a = ([f"a{i:03d}" * 10 for i in range(100)], ["ha"])  # 40 chars each, 4000 in all
    b = ([f"b{i:03d}" * 5 for i in range(100)], ["hb1", "hb2"])  # 20 chars each, 2000 in all
    train, held = mix({"a": {"weight": 1.0, "data": a}, "b": {"weight": 3.0, "data": b}}, seed=0)
    ca = sum(len(t) for t in train if t.startswith("a"))
    cb = sum(len(t) for t in train if t.startswith("b"))
    assert cb == 2000 and 600 <= ca <= 700  # b is the scarce one: all of it, and a at a third of that
    assert sorted(held) == ["ha", "hb1", "hb2"] and len(set(train)) == len(train)
    assert mix({"a": {"weight": 1.0, "data": a}, "b": {"weight": 3.0, "data": b}}, seed=0) == (train, held)
    # every text carries its component's name (the validation split is measured component by component)
    assert [t[0] for t in train] == train.labels and held.labels == ["a", "b", "b"]
    with pytest.raises(ValueError, match="weight"):
        mix({"a": {"weight": 0.0, "data": a}})


def test_data_configs_compose_and_build(loads, monkeypatch):
    counted = models.tiny_llama  # the default mix prompts from the chat template: give the tiny tokenizer one

    def with_template(**kw):
        m, tok = counted(**kw)
        tok.chat_template = CHAT
        return m, tok

    monkeypatch.setattr(models, "tiny_llama", with_template)
    root = OmegaConf.create({"seed": 0, "model": MODEL, "data": OmegaConf.load(CONF / "mix.yaml")})
    root.data.components.self_generated.data.update(SMALL)
    root.data.components.kjv.data.max_train_texts = 50
    root.data.components.kjv.data.max_heldout_texts = 5
    train, held = instantiate(root.data)
    assert len(loads) == 1 and len(train) > 5 and len(held) == 1 + 5
    sg = OmegaConf.create({"seed": 0, "model": MODEL, "data": OmegaConf.load(CONF / "self_generated.yaml")})
    sg.data.update({**SMALL, "seed_text": root.data.components.self_generated.data.seed_text})
    t2, h2 = instantiate(sg.data)
    assert len(loads) == 1, "data=self_generated and data=mix share the cache entry of the same settings"
    assert len(t2) == 5 and set(t2) <= set(train)
    assert any(t.startswith("<|endoftext|>user") for t in t2)  # the chat rows of the default mix


def test_sampler_records_the_teacher_top_k_of_every_position_as_a_full_forward_gives_it():
    model, _ = tiny()
    prefix = torch.randint(1, 200, (3, 4), generator=torch.Generator().manual_seed(0))
    plain = sample_tokens(model, prefix, 8, 1.0, 0.9, 20, generator=torch.Generator().manual_seed(1))
    out, ids, logp = sample_tokens(model, prefix, 8, 1.0, 0.9, 20, generator=torch.Generator().manual_seed(1),
                                   record_topk=300)  # > V = 257: the whole vocabulary, sorted
    assert torch.equal(out, plain), "recording the top-k does not change the samples"
    assert ids.shape == logp.shape == (3, 12, 257) and logp.dtype == torch.float32
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=out).logits.float(), -1)  # untempered, unfiltered, every position
    torch.testing.assert_close(logp, ref.gather(-1, ids), rtol=0, atol=1e-5)
    assert torch.equal(ids[..., 0], ref.argmax(-1)) and bool((logp[..., :-1] >= logp[..., 1:]).all())
    full_ids, full_logp = sources.topk_logprobs(model, out, 5)  # the forward path, for rows sampled without it
    assert torch.equal(full_ids, ids[..., :5]) and torch.allclose(full_logp, logp[..., :5], atol=1e-5)


def test_teacher_top_k_is_cached_under_its_own_key_and_an_old_entry_is_completed_by_one_forward(cache, loads):
    old_train, old_held = self_generated(MODEL, **SMALL, teacher_topk=0)  # an entry written before the top-k
    assert not old_train.has_teacher and old_train.tokens.shape == (5, 12)
    old_file = next((cache / "self_generated").glob("*.safetensors"))
    old_bytes = old_file.read_bytes()
    train, held = self_generated(MODEL, **SMALL, teacher_topk=4)
    assert len(loads) == 2, "the samples came from the old entry, the top-k from one forward of the model"
    assert torch.equal(train.tokens, old_train.tokens) and list(train) == list(old_train)
    assert train.teacher_ids.shape == (5, 12, 4) and train.teacher_logp.dtype == torch.float16
    assert held.teacher_ids.shape == (1, 12, 4) and old_file.read_bytes() == old_bytes, "the old file is untouched"
    assert len(list((cache / "self_generated").glob("*.safetensors"))) == 2
    again, _ = self_generated(MODEL, **SMALL, teacher_topk=4)
    assert len(loads) == 2 and torch.equal(again.teacher_ids, train.teacher_ids)
    assert torch.equal(again.teacher_logp, train.teacher_logp)
    fresh, _ = self_generated(MODEL, **SMALL, teacher_topk=4, teacher_dtype="float32", cache=False)  # while sampling
    assert torch.equal(fresh.tokens, train.tokens) and torch.equal(fresh.teacher_ids, train.teacher_ids)
    err = (fresh.teacher_logp - train.teacher_logp.float()).abs().max()
    assert 0 < float(err) < 0.01, "float16 storage rounds the log-probabilities, by less than 0.01"
    with pytest.raises(ValueError, match="teacher_topk"):
        self_generated(MODEL, **SMALL, teacher_topk=-1)
    with pytest.raises(ValueError, match="teacher_dtype"):
        self_generated(MODEL, **SMALL, teacher_dtype="int8")
