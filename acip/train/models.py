"""Model builders named by ``conf/model/*.yaml``: each returns ``(model, tokenizer)``.

``load_pretrained`` goes through :func:`acip.load_base` (hub id, local path or the packaged
SmolLM2). ``tiny_llama`` builds a small random Llama plus a byte-level tokenizer, saves both once
to acip's cache (``<cache_dir>/tiny_llama/<digest of its arguments>``) and loads them back through
``acip.load_base``, so that a tiny run's saved config points at a real local path and a fresh
process can rebuild it. Neither writes into the run directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import torch

__all__ = ["load_pretrained", "tiny_llama", "byte_tokenizer", "model_dtype"]

TINY_FORMAT = 1  # bump when tiny_llama builds another model from the same arguments


def model_dtype(dtype: Any) -> torch.dtype:
    """``model.dtype`` (``float32``, ``bfloat16``, ``float16``; ``torch.`` prefix allowed) as a torch dtype."""
    name = str(dtype or "float32").replace("torch.", "")
    torch_dtype = getattr(torch, name, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"model.dtype={dtype!r} is not a torch float dtype; use float32, bfloat16 or float16")
    return torch_dtype


def load_pretrained(path: str, dtype: str = "float32") -> tuple[Any, Any]:
    """``acip.load_base(path, dtype=dtype)`` (masks, scores and losses stay fp32 whatever the dtype)."""
    import acip

    if not path or str(path) == "???":
        raise ValueError(
            "model.path is empty: pass a hub id or a local directory, e.g. "
            "model=hf model.path=/models/qwen2.5-0.5b"
        )
    return acip.load_base(str(path), dtype=model_dtype(dtype))  # the saved source records the dtype


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
    dtype: str = "float32",
) -> tuple[Any, Any]:
    """A random Llama (seeded) with the byte tokenizer, cached as a local model directory.

    The cached weights are fp32 (the same directory for every ``dtype``); ``dtype`` is the dtype
    it is loaded in (``bfloat16`` for bf16 runs).

    The directory is a pure function of the arguments (and the transformers version): any process
    (DDP ranks included) builds the same one, published with one rename; a concurrent builder's
    copy is discarded.
    """
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    import acip
    from acip.core.base import cache_dir

    args = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                max_position_embeddings=max_position_embeddings, seed=seed)
    key = json.dumps({**args, "format": TINY_FORMAT, "transformers": transformers.__version__}, sort_keys=True)
    target = cache_dir() / "tiny_llama" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        tok = byte_tokenizer()
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tiny_llama.json").write_text(key)
        try:
            os.replace(tmp, target)
        except OSError:  # another process published it first
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return acip.load_base(str(target), dtype=model_dtype(dtype))
