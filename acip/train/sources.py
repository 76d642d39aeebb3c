"""Training data that covers what the model knows: its own samples, and weighted mixtures.

Both builders are text sources like those of :mod:`acip.train.data` (named by ``conf/data/*.yaml``,
returning ``(train_texts, heldout_texts)``), so everything downstream (packing, the whitening
calibration, the final evaluation) treats them like any text.

- :func:`self_generated`: sequences sampled from the base model itself, from BOS or from short
  prompts drawn from a seed text (temperature, top-p, optional top-k; seeded and deterministic on
  one machine and thread count). Sampled once per (model, settings) with :func:`sample_tokens`
  (a pre-allocated static KV cache, one forward per token for the whole batch) and cached under
  ``acip.core.base.cache_dir() / "self_generated"`` with per-tensor sha256
  (:func:`acip.core.io.save_tensors`); a second run reads the cache and loads no model. The last
  ``heldout_fraction`` of the sequences is the validation split of this training data.
- :func:`mix`: a weighted mixture of other data groups (by characters), e.g. self-generated
  samples + KJV + your own text files; its held-out part is the union of the components'.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["self_generated", "mix", "sample_tokens", "seed_prompts", "cache_path", "CACHE_VERSION"]

CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------ sampling
NUCLEUS_CANDIDATES = 256  # top-p looks at the 256 most likely tokens first (a full sort only for rows that need it)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """One token per row after temperature, top-k and top-p (nucleus) filtering; exact.

    A full-vocabulary sort costs ~30x a top-k on CPU, so the nucleus is searched among the
    ``NUCLEUS_CANDIDATES`` most likely tokens, and only rows whose nucleus is larger than that are
    sorted in full (same result as a full sort, ties aside).
    """
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    k = top_k if top_k and top_k < V else 0
    if not k and top_p >= 1.0:
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    cand = min(V, k or NUCLEUS_CANDIDATES)
    vals, ids = torch.topk(logits, cand, dim=-1)  # sorted, descending
    if top_p < 1.0:
        if k:  # the nucleus of the top-k distribution
            probs = torch.softmax(vals, -1)
        else:
            probs = torch.exp(vals - torch.logsumexp(logits, -1, keepdim=True))
            short = probs.sum(-1) < top_p  # the nucleus reaches past the candidates: sort these rows fully
            if bool(short.any()):
                rows = short.nonzero().squeeze(1)
                full_vals, full_ids = torch.sort(logits[rows], -1, descending=True)
                picked = _nucleus_pick(full_vals, full_ids, torch.softmax(full_vals, -1), top_p, generator)
                rest = (~short).nonzero().squeeze(1)
                out = torch.empty(logits.shape[0], dtype=torch.long)
                out[rows] = picked
                if len(rest):
                    out[rest] = _nucleus_pick(vals[rest], ids[rest], probs[rest], top_p, generator)
                return out
        return _nucleus_pick(vals, ids, probs, top_p, generator)
    pick = torch.multinomial(torch.softmax(vals, -1), 1, generator=generator)
    return ids.gather(1, pick).squeeze(1)


def _nucleus_pick(vals: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before it already reaches top_p (the first stays)
    pick = torch.multinomial(torch.softmax(vals.masked_fill(drop, float("-inf")), -1), 1, generator=generator)
    return ids.gather(1, pick).squeeze(1)


@torch.inference_mode()
def sample_tokens(model: Any, prefix: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, generator: torch.Generator | None = None, cache: str = "static",
                  on_step: Any = None) -> torch.Tensor:
    """Sample ``new_tokens`` tokens after ``prefix`` (batch x P) with a pre-allocated KV cache.

    One prefill, then one forward of one token per row per step; only the last position's logits
    are computed (``logits_to_keep=1``). ``cache="static"`` pre-allocates ``transformers.StaticCache``
    for ``P + new_tokens`` positions; ``"dynamic"`` grows a ``DynamicCache``. Returns
    ``(batch, P + new_tokens)`` int64 (EOS is not special: the model's own continuation is kept).
    ``on_step(n)`` is called after each step with the tokens it added (progress bars).
    """
    from transformers import DynamicCache, StaticCache

    B, P = prefix.shape
    L = P + new_tokens
    out = torch.empty(B, L, dtype=torch.long)
    out[:, :P] = prefix
    kv = StaticCache(config=model.config, max_cache_len=L) if cache == "static" else DynamicCache()
    pos = torch.arange(L)
    ids = prefix
    for t in range(P, L):
        cp = pos[t - ids.shape[1]: t]
        logits = model(input_ids=ids, past_key_values=kv, cache_position=cp, position_ids=cp.unsqueeze(0).expand(B, -1),
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        nxt = _sample(logits, temperature, top_p, top_k, generator)
        out[:, t] = nxt
        ids = nxt.unsqueeze(1)
        if on_step is not None:
            on_step(B if t > P else B * (P + 1))
    return out


# ------------------------------------------------------------------------------------------ prompts
def _seed_texts(seed_text: Any) -> list[str]:
    """``"kjv"`` (the KJV *training* verses), a list of text files, or None (no prompts)."""
    if seed_text is None or seed_text == "none":
        return []
    if seed_text == "kjv":
        from acip.data import kjv_split

        return list(kjv_split()[0])
    from .data import text_files

    paths = [seed_text] if isinstance(seed_text, str) else list(seed_text)
    train, _ = text_files(paths, heldout_fraction=0.1)  # never prompt from a file's held-out part
    return train


def seed_prompts(tokenizer: Any, texts: Sequence[str], n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``prompt_tokens`` tokens: the start of seeded-random texts long enough."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    tries = 0
    while len(out) < n and tries < 50 * max(n, 1):
        tries += 1
        ids = tokenizer(texts[rng.randrange(len(texts))], add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            out.append(ids[:prompt_tokens])
    if len(out) < n:
        raise ValueError(f"data.seed_text has too few texts of >= {prompt_tokens} tokens for {n} prompts; "
                         f"lower data.prompt_tokens or data.prompt_fraction")
    return out


def _bos(tokenizer: Any, model: Any) -> int:
    for v in (tokenizer.bos_token_id, getattr(model.config, "bos_token_id", None), tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


# ------------------------------------------------------------------------------------------ the cache
def _model_identity(model: Any) -> dict:
    from omegaconf import OmegaConf

    ident = OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else dict(model)
    path = ident.get("path")
    if isinstance(path, str) and os.path.exists(path):  # a local model: its files' size and mtime too
        p = Path(path)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        ident["files"] = [(str(q.relative_to(p)) if q != p else q.name, q.stat().st_size, int(q.stat().st_mtime))
                          for q in files]
    return ident


def cache_path(key_fields: Mapping[str, Any]) -> Path:
    from acip.core.base import cache_dir

    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "self_generated" / f"{key}.safetensors"


def _decode(tokenizer: Any, rows: torch.Tensor, prefix_len: torch.Tensor) -> list[str]:
    """Text of each row after its BOS; EOS/special tokens are skipped (they split, they do not end, a text)."""
    return [tokenizer.decode(r[int(p):].tolist(), skip_special_tokens=True) for r, p in zip(rows, prefix_len)]


def self_generated(
    model: Any, num_sequences: int = 288, seq_len: int = 128, batch_size: int = 64, temperature: float = 1.0,
    top_p: float = 0.95, top_k: int = 50, prompt_fraction: float = 0.5, prompt_tokens: int = 4,
    seed_text: Any = "kjv", heldout_fraction: float = 0.1, seed: int = 0, cache: bool = True,
    kv_cache: str = "static", progress: bool = True,
) -> tuple[list[str], list[str]]:
    """``num_sequences`` samples of ``seq_len`` tokens (BOS + prompt included) from the model ``model``
    (its ``conf/model`` node: ``data.model=${model}``); ``(train_texts, heldout_texts)``.

    ``prompt_fraction`` of the batches start from BOS + ``prompt_tokens`` tokens of a seeded-random
    ``seed_text`` text (``"kjv"``: the KJV training verses, or a list of text files, or null), the
    rest from BOS alone. The last ``heldout_fraction`` of the sequences is held out (validation).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if num_sequences < 2 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"data.num_sequences ({num_sequences}) and data.seq_len ({seq_len}) must be >= 2, "
                         f"data.batch_size ({batch_size}) >= 1")
    if not 0.0 <= prompt_fraction <= 1.0 or (prompt_fraction > 0 and not 1 <= prompt_tokens < seq_len):
        raise ValueError(f"data.prompt_fraction must be in [0, 1] and data.prompt_tokens in [1, seq_len), got "
                         f"{prompt_fraction}, {prompt_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"data.temperature >= 0, data.top_p in (0, 1], data.top_k >= 0; got {temperature}, {top_p}, {top_k}")
    settings = dict(num_sequences=num_sequences, seq_len=seq_len, batch_size=batch_size, temperature=temperature,
                    top_p=top_p, top_k=top_k, prompt_fraction=prompt_fraction, prompt_tokens=prompt_tokens,
                    seed_text=seed_text if isinstance(seed_text, (str, type(None))) else list(seed_text),
                    seed=seed, kv_cache=kv_cache)
    ident = _model_identity(model)
    path = cache_path({"version": CACHE_VERSION, "model": ident, **settings})
    texts = _read_cache(path) if cache and path.is_file() else None
    if texts is not None:
        print(f"[acip] self-generated data: {len(texts)} sequences of {seq_len} tokens from the cache {path}", flush=True)
    else:
        from hydra.utils import instantiate

        m, tok = instantiate(model) if not isinstance(model, tuple) else model
        rows, plen = _generate(m, tok, settings, progress)
        del m
        texts = _decode(tok, rows, plen)
        if cache:
            from acip.core.io import save_tensors

            blob = torch.frombuffer(bytearray(json.dumps(texts).encode("utf-8")), dtype=torch.uint8)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, {"tokens": rows.to(torch.int32), "texts_utf8": blob},
                         metadata={"settings": json.dumps(settings, sort_keys=True),
                                   "model": json.dumps(ident, sort_keys=True, default=str)})
    cut = max(1, min(len(texts) - 1, int(round(len(texts) * (1.0 - heldout_fraction)))))
    return texts[:cut], texts[cut:]


def _read_cache(path: Path) -> list[str] | None:
    """The cached texts, or None (with a warning naming the file) when the file fails its checksums."""
    import warnings

    from acip.core.io import ArtifactError, read_tensors

    try:
        tensors, _ = read_tensors(path, what="self-generated data cache")  # sha256 of every tensor checked
        return json.loads(tensors["texts_utf8"].numpy().tobytes().decode("utf-8"))
    except (ArtifactError, KeyError, ValueError) as e:
        warnings.warn(f"the self-generated data cache {str(path)!r} is damaged ({e}); sampling it again")
        return None


def _generate(model: Any, tok: Any, s: Mapping[str, Any], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of :func:`self_generated`; ``(tokens, prefix_len)``. Deterministic in ``s["seed"]``."""
    from tqdm.auto import tqdm

    model.eval()
    n, L, B = int(s["num_sequences"]), int(s["seq_len"]), int(s["batch_size"])
    nb = math.ceil(n / B)
    n_prompted = int(round(nb * float(s["prompt_fraction"])))
    prompted = set(random.Random(int(s["seed"])).sample(range(nb), n_prompted))
    prompts = seed_prompts(tok, _seed_texts(s["seed_text"]), n_prompted * B, int(s["prompt_tokens"]),
                           int(s["seed"])) if n_prompted else []
    bos = _bos(tok, model)
    g = torch.Generator().manual_seed(int(s["seed"]))
    rows, plen, used = [], [], 0
    t0 = time.perf_counter()
    bar = tqdm(total=n * L, desc="self-generated data", unit="tok", unit_scale=True, disable=not progress,
               mininterval=2.0)
    done = [0]

    def step(k: int) -> None:
        done[0] += k
        bar.update(k)
        bar.set_postfix_str(f"{done[0] / (time.perf_counter() - t0):.0f} tokens/s", refresh=False)
    for b in range(nb):
        rb = min(B, n - b * B)
        if b in prompted:
            body = torch.tensor(prompts[used: used + rb], dtype=torch.long)
            used += B
            prefix = torch.cat([torch.full((rb, 1), bos, dtype=torch.long), body], dim=1)
        else:
            prefix = torch.full((rb, 1), bos, dtype=torch.long)
        out = sample_tokens(model, prefix, L - prefix.shape[1], float(s["temperature"]), float(s["top_p"]),
                            int(s["top_k"]), generator=g, cache=str(s["kv_cache"]), on_step=step)
        rows.append(out)
        plen.append(torch.ones(rb, dtype=torch.long))  # the text starts after BOS (the prompt is kept)
    bar.close()
    return torch.cat(rows), torch.cat(plen)


# ------------------------------------------------------------------------------------------ mixtures
def mix(components: Mapping[str, Any], seed: int = 0, max_chars: int | None = None) -> tuple[list[str], list[str]]:
    """A weighted mixture of data groups: ``components = {name: {weight: w, data: <data node>}}``.

    Each component's training texts are shuffled (seeded) and cut so that the characters of the
    components stand in the ratio of their weights, as large as the scarcest component allows (and
    at most ``max_chars`` in all); the union is shuffled again. The held-out part is the union of
    every component's held-out texts (each the validation split of that training data).
    """
    from hydra.utils import instantiate

    if not components:
        raise ValueError("data.components is empty: name at least one {weight: w, data: {...}} component")
    parts: dict[str, tuple[float, list[str], list[str]]] = {}
    for name, comp in components.items():
        w = float(comp.get("weight", 1.0))
        if not w > 0:
            raise ValueError(f"data.components.{name}.weight must be > 0, got {w}")
        node = comp["data"]
        train, heldout = node if isinstance(node, tuple) else instantiate(node, _recursive_=False)
        if not train:
            raise ValueError(f"data.components.{name} has no training text")
        parts[name] = (w, list(train), list(heldout))
    total_w = sum(w for w, _, _ in parts.values())
    scale = min(sum(map(len, tr)) / (w / total_w) for w, tr, _ in parts.values())
    if max_chars is not None:
        scale = min(scale, float(max_chars))
    rng = random.Random(seed)
    train_out: list[str] = []
    heldout_out: list[str] = []
    for name, (w, tr, ho) in parts.items():
        order = list(range(len(tr)))
        rng.shuffle(order)
        budget, used = scale * w / total_w, 0
        for i in order:
            if used >= budget:
                break
            train_out.append(tr[i])
            used += len(tr[i])
        heldout_out += ho
    rng.shuffle(train_out)
    return train_out, heldout_out
