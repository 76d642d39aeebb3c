"""Shared fixtures: tiny random models of several families, and the real SmolLM2 (once per session)."""
from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(family: str):
    """A tiny random config of ``family`` (llama, qwen2, mistral, gemma, phi3, opt, bert, gpt2)."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY)
    if family == "mistral":
        return tf.MistralConfig(**TINY)
    if family == "gemma":
        return tf.GemmaConfig(**TINY, head_dim=16)
    if family == "phi3":
        return tf.Phi3Config(**TINY, pad_token_id=0)
    if family == "opt":
        return tf.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                            num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64)
    if family == "bert":
        return tf.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0):
    """A tiny randomly initialised model in fp32, eval mode (causal LM; BERT: masked LM)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    if family == "bert":
        return tf.BertForMaskedLM(cfg).eval()
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (fp32) and its tokenizer; converted once, then cached by acip."""
    import acip

    return acip.load_base("smollm2-135m")
