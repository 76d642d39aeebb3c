"""Model builders named by ``conf/model/*.yaml``: each returns ``(model, tokenizer)``.

``load_pretrained`` goes through :func:`acip.load_base` (hub id, local path or the packaged
SmolLM2). ``tiny_llama`` builds a small random Llama plus a byte-level tokenizer, saves both to
``<run_dir>/base_model`` and loads them back through ``acip.load_base``, so that the score map of
a tiny run points at a real local path and a fresh process can export from it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_pretrained", "tiny_llama", "byte_tokenizer"]


def _rank() -> int:
    """Global rank from the launcher's environment (0 before any process group exists)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def load_pretrained(path: str, dtype: str = "float32", workdir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """``acip.load_base(path)``; ``dtype`` is cast after loading (training math stays fp32)."""
    import acip

    if not path or str(path) == "???":
        raise ValueError(
            "model.path is empty: pass a hub id or a local directory, e.g. "
            "model=hf model.path=/models/qwen2.5-0.5b"
        )
    model, tok = acip.load_base(str(path))
    if dtype and dtype != "float32":
        model = model.to(getattr(torch, dtype))
    return model, tok


def byte_tokenizer() -> Any:
    """A 257-token byte-level BPE tokenizer with no merges (256 bytes + ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    tok.pad_token = tok.eos_token
    return tok


def tiny_llama(
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """A random Llama (seeded) with the byte tokenizer, saved to ``<workdir>/base_model``.

    Only rank 0 writes; in DDP the other ranks start after rank 0 has built the trainer, so the
    directory already exists when they load it.
    """
    import acip
    from transformers import AutoModelForCausalLM, LlamaConfig

    if workdir is None:
        raise ValueError("tiny_llama needs workdir= (the run directory) to save its base model in")
    target = Path(workdir) / "base_model"
    if not (target / "config.json").is_file():
        if _rank() != 0:
            raise FileNotFoundError(f"rank {_rank()}: {target} was not written by rank 0")
        tok = byte_tokenizer()
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        gen = torch.random.fork_rng()
        with gen:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    return acip.load_base(str(target))
