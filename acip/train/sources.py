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
  ``heldout_fraction`` of the sequences is the validation split of this training data. It returns
  :class:`~acip.train.data.TokenRows` (the texts, which carry the exact token rows), and with
  ``teacher_topk = K > 0`` the teacher's top-K next-token log-probabilities at every position,
  which the sampler has already computed: the ``kd`` objective then needs no teacher forward.
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

__all__ = ["self_generated", "mix", "sample_tokens", "topk_logprobs", "packed_teacher_topk", "seed_prompts",
           "cache_path", "CACHE_VERSION"]

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


def _topk_logp(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, log p)`` of the ``k`` most likely tokens of ``softmax(logits)`` (fp32, untempered), sorted."""
    logits = logits.float()
    vals, ids = torch.topk(logits, min(int(k), logits.shape[-1]), dim=-1)
    return ids, vals - torch.logsumexp(logits, -1, keepdim=True)


@torch.inference_mode()
def sample_tokens(model: Any, prefix: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, generator: torch.Generator | None = None, cache: str = "static",
                  on_step: Any = None, record_topk: int = 0) -> Any:
    """Sample ``new_tokens`` tokens after ``prefix`` (batch x P) with a pre-allocated KV cache.

    One prefill, then one forward of one token per row per step; only the last position's logits
    are computed (``logits_to_keep=1``). ``cache="static"`` pre-allocates ``transformers.StaticCache``
    for ``P + new_tokens`` positions; ``"dynamic"`` grows a ``DynamicCache``. Returns
    ``(batch, P + new_tokens)`` int64 (EOS is not special: the model's own continuation is kept).
    ``on_step(n)`` is called after each step with the tokens it added (progress bars).

    ``record_topk = K > 0`` also keeps, at every position ``t`` of every row, the ``K`` most likely
    next tokens of the model and ``log p(x_{t+1} | x_{<=t})`` (T = 1, before temperature / top-k /
    top-p): the prefill computes every prompt position's logits, each step the sampled position's,
    and one more step after the last token gives the last position's. Returns ``(tokens, ids, logp)``
    with ``ids`` int64 and ``logp`` fp32 of shape ``(batch, P + new_tokens, K)``.
    """
    from transformers import DynamicCache, StaticCache

    B, P = prefix.shape
    L = P + new_tokens
    K = int(record_topk)
    out = torch.empty(B, L, dtype=torch.long)
    out[:, :P] = prefix
    if K:
        rec_ids = torch.empty(B, L, min(K, int(model.config.vocab_size)), dtype=torch.long)
        rec_logp = torch.empty(rec_ids.shape, dtype=torch.float32)
    kv = StaticCache(config=model.config, max_cache_len=L) if cache == "static" else DynamicCache()
    pos = torch.arange(L)
    ids = prefix
    for t in range(P, L + (1 if K else 0)):
        cp = pos[t - ids.shape[1]: t]
        logits = model(input_ids=ids, past_key_values=kv, cache_position=cp, position_ids=cp.unsqueeze(0).expand(B, -1),
                       use_cache=True, logits_to_keep=0 if K and t == P else 1).logits
        if K:  # the distribution after every position just fed (the whole prompt at the prefill)
            rec_ids[:, cp[0]: t], rec_logp[:, cp[0]: t] = _topk_logp(logits, K)
        if t == L:
            break
        nxt = _sample(logits[:, -1], temperature, top_p, top_k, generator)
        out[:, t] = nxt
        ids = nxt.unsqueeze(1)
        if on_step is not None:
            on_step(B if t > P else B * (P + 1))
    return (out, rec_ids, rec_logp) if K else out


@torch.no_grad()  # not inference_mode: the ids index the student's logits in autograd
def topk_logprobs(model: Any, tokens: torch.Tensor, k: int, batch_size: int = 8,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-``k`` at every position of ``tokens`` (N x L) by full forwards (no KV cache).

    ``(ids, logp)``, each ``(N, L, k)``: ``ids`` int64, ``logp = log softmax(logits)`` fp32 (T = 1),
    position ``t`` the distribution of the token after ``t``. The same quantities
    :func:`sample_tokens` records while sampling; this serves token rows sampled without them.
    """
    from tqdm.auto import tqdm

    if tokens.dim() != 2 or int(k) < 1:
        raise ValueError(f"topk_logprobs needs tokens of shape (rows, seq_len) and k >= 1, got "
                         f"{tuple(tokens.shape)} and k={k}")
    model.eval()
    ids, logp = [], []
    for i in tqdm(range(0, len(tokens), batch_size), desc="teacher top-k", disable=not progress, mininterval=2.0):
        logits = model(input_ids=tokens[i: i + batch_size].long(), use_cache=False).logits
        a, b = _topk_logp(logits, k)
        ids.append(a)
        logp.append(b)
    return torch.cat(ids), torch.cat(logp)


TEACHER_TOPK_MAX_BYTES = 4 << 30  # the cached top-k of packed rows is held in memory: refuse more than 4 GiB


def packed_teacher_topk(model: Any, sequences: torch.Tensor, k: int, dtype: str = "float16", *,
                        model_key: Any = None, cache: bool = True, progress: bool = True,
                        batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's top-``k`` next-token log-probabilities at every position of packed training
    rows ``sequences`` (N x L): ``(teacher_ids int32, teacher_logp dtype)``, each ``(N, L, k)``.

    This is what ``data=self_generated`` records while sampling, for any other data: with it the
    ``kd`` / ``ce_kd`` objectives need no teacher forward per step (docs/BENCHMARKS.md: 1.07-1.10x
    a CE step instead of 1.7-1.9x). ``model`` must be the *uncompressed* base model, on the device it
    should run on. One forward per ``batch_size`` rows, no gradient; the result is cached under
    ``cache_dir() / "teacher_topk"`` keyed by the rows' sha256, ``model_key`` (the run's model node)
    and (k, dtype), with per-tensor checksums, so a second run with the same data reads it.
    The rows take ``N * L * k * (4 + bytes(dtype))`` bytes; more than 4 GiB is refused.
    """
    from acip.core.io import ArtifactError, read_tensors, save_tensors

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"objective.teacher_topk must be an integer >= 1 here (0 switches the cache off), got {k!r}")
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"objective.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {dtype!r}")
    if sequences.dim() != 2:
        raise ValueError(f"packed_teacher_topk needs token rows of shape (rows, seq_len), got {tuple(sequences.shape)}")
    n, length = sequences.shape
    nbytes = n * length * k * (4 + TEACHER_DTYPES[dtype].itemsize)
    if nbytes > TEACHER_TOPK_MAX_BYTES:
        raise ValueError(f"the teacher's top-{k} of {n} x {length} training tokens would take {nbytes / 2**30:.1f} GiB "
                         f"in memory (limit {TEACHER_TOPK_MAX_BYTES >> 30} GiB): lower objective.teacher_topk, train on "
                         f"fewer tokens, or set objective.teacher_topk=0 (the dense teacher forward every step)")
    rows = sequences.to(torch.int32).cpu().contiguous()
    digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    ident = _model_identity(model_key) if model_key is not None else None
    key = {"version": CACHE_VERSION, "rows": digest, "shape": [n, length], "model": ident, "k": k, "dtype": dtype}
    path = cache_path(key, kind="teacher_topk")
    if cache and ident is not None and path.is_file():
        try:
            tensors, _ = read_tensors(path, what="teacher top-k cache")
            if tuple(tensors["teacher_ids"].shape) == (n, length, k):
                print(f"[acip] the teacher's top-{k} of {n} training rows from the cache {path}", flush=True)
                return tensors["teacher_ids"], tensors["teacher_logp"]
        except (ArtifactError, KeyError, ValueError) as e:
            import warnings

            warnings.warn(f"the teacher top-k cache {str(path)!r} is damaged ({e}); computing it again")
    print(f"[acip] the teacher's top-{k} of {n} training rows x {length} tokens ({nbytes / 2**20:.0f} MiB): one "
          f"forward of the base model over them", flush=True)
    device = next(model.parameters()).device
    was_training = model.training
    ids, logp = topk_logprobs(model, rows.to(device), k, batch_size=batch_size, progress=progress)
    model.train(was_training)
    ids, logp = ids.to(torch.int32).cpu(), logp.to(TEACHER_DTYPES[dtype]).cpu()
    if cache and ident is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"teacher_ids": ids, "teacher_logp": logp},
                     metadata={"key": json.dumps(key, sort_keys=True, default=str)})
    return ids, logp


# ------------------------------------------------------------------------------------------ prompts
def _seed_texts(seed_text: Any) -> list[str]:
    """``"kjv"`` (the KJV *training* verses), a list of text files, or None (no prompts); ``"chat"`` is
    handled by :func:`chat_prompt`."""
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


def cache_path(key_fields: Mapping[str, Any], kind: str = "self_generated") -> Path:
    """``cache_dir() / kind / <20 hex digits of the sha256 of key_fields>.safetensors``."""
    from acip.core.base import cache_dir

    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / kind / f"{key}.safetensors"


def _decode(tokenizer: Any, rows: torch.Tensor, prefix_len: torch.Tensor) -> list[str]:
    """Text of each row after its BOS; EOS/special tokens are skipped (they split, they do not end, a text).
    A row with ``prefix_len == 0`` starts with the chat template (``seed_text: chat``): it keeps its special
    tokens, so that the text re-tokenizes (``data=mix``) into the same turns."""
    return [tokenizer.decode(r[int(p):].tolist(), skip_special_tokens=bool(int(p))) for r, p in zip(rows, prefix_len)]


def chat_prompt(tokenizer: Any) -> list[int]:
    """The tokens that open a user turn in the model's own chat template (``seed_text: chat``): the
    template rendered for one user message, cut where the message would start (with the template's
    default system turn, if it has one). The model then writes the user's request and its answer:
    samples of what the model is used for, on any chat model, with no text of ours in them."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.seed_text=chat needs a tokenizer with a chat template, and this model's has none: "
                         "use seed_text=kjv, a list of text files, or null (BOS only)")
    mark = "\u241fACIP-USER-TURN\u241f"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    if mark not in text:
        raise ValueError("the model's chat template does not render the user message; use another data.seed_text")
    return list(tokenizer(text[: text.index(mark)], add_special_tokens=False)["input_ids"])


TEACHER_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def self_generated(
    model: Any, num_sequences: int = 288, seq_len: int = 128, batch_size: int = 64, temperature: float = 1.0,
    top_p: float = 0.95, top_k: int = 50, prompt_fraction: float = 0.5, prompt_tokens: int = 4,
    seed_text: Any = "kjv", heldout_fraction: float = 0.1, seed: int = 0, cache: bool = True,
    kv_cache: str = "static", progress: bool = True, teacher_topk: int = 64, teacher_dtype: str = "float16",
) -> tuple[Any, Any]:
    """``num_sequences`` samples of ``seq_len`` tokens (BOS + prompt included) from the model ``model``
    (its ``conf/model`` node: ``data.model=${model}``); ``(train, heldout)``, each a
    :class:`~acip.train.data.TokenRows` (a list of the texts after BOS, carrying the token rows).

    ``prompt_fraction`` of the batches start from BOS + ``prompt_tokens`` tokens of a seeded-random
    ``seed_text`` text (``"kjv"``: the KJV training verses, or a list of text files, or null), the
    rest from BOS alone. ``seed_text="chat"``: the prompted batches start from the model's chat template
    opening a user turn instead (:func:`chat_prompt`; ``prompt_tokens`` is then unused), so the model
    writes a request and answers it. The last ``heldout_fraction`` of the sequences is held out (validation).

    ``teacher_topk = K > 0``: the rows also carry, at every position, the model's ``K`` most likely
    next tokens and their log-probabilities (T = 1, before the sampling filters), stored as
    ``teacher_dtype``, recorded while sampling. The cache is keyed by (K, dtype) as well; when only
    the entry without them exists, its tokens are kept and the top-K computed by one forward pass
    over them (:func:`topk_logprobs`), into a new entry (the old file is left as it is).
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
    if isinstance(teacher_topk, bool) or not isinstance(teacher_topk, int) or teacher_topk < 0:
        raise ValueError(f"data.teacher_topk must be an integer >= 0 (0: no teacher top-k), got {teacher_topk!r}")
    if teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"data.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {teacher_dtype!r}")
    settings = dict(num_sequences=num_sequences, seq_len=seq_len, batch_size=batch_size, temperature=temperature,
                    top_p=top_p, top_k=top_k, prompt_fraction=prompt_fraction, prompt_tokens=prompt_tokens,
                    seed_text=seed_text if isinstance(seed_text, (str, type(None))) else list(seed_text),
                    seed=seed, kv_cache=kv_cache)
    ident = _model_identity(model)
    samples_key = {"version": CACHE_VERSION, "model": ident, **settings}  # the key of the samples alone
    K, dt = int(teacher_topk), TEACHER_DTYPES[teacher_dtype]
    extra = {"teacher_topk": K, "teacher_dtype": teacher_dtype} if K else {}
    path = cache_path({**samples_key, **extra})
    rows = _read_cache(path, K) if cache and path.is_file() else None
    if rows is not None:
        print(f"[acip] self-generated data: {len(rows)} sequences of {seq_len} tokens from the cache {path}", flush=True)
    else:
        from hydra.utils import instantiate

        from .data import TokenRows, vocab_digest

        plain = cache_path(samples_key)
        base = _read_cache(plain, 0) if K and cache and plain.is_file() else None
        m, tok = instantiate(model) if not isinstance(model, tuple) else model
        if base is not None:  # the samples exist without the top-k: one forward over them
            print(f"[acip] self-generated data: {len(base)} sequences from the cache {plain}; the teacher's top-{K} "
                  f"by one forward over them", flush=True)
            ids, logp = topk_logprobs(m, base.tokens, K, progress=progress)
            rows = TokenRows(base, base.tokens, ids, logp.to(dt), vocab_digest(tok))
        else:
            tokens, plen, ids, logp = _generate(m, tok, {**settings, "teacher_topk": K}, progress)
            rows = TokenRows(_decode(tok, tokens, plen), tokens, ids, None if logp is None else logp.to(dt),
                             vocab_digest(tok))
        del m
        if cache:
            _write_cache(path, rows, {**settings, **extra}, ident)
    cut = max(1, min(len(rows) - 1, int(round(len(rows) * (1.0 - heldout_fraction)))))
    return rows[:cut], rows[cut:]


def _write_cache(path: Path, rows: Any, settings: Mapping[str, Any], ident: Any) -> None:
    from acip.core.io import save_tensors

    blob = torch.frombuffer(bytearray(json.dumps(list(rows)).encode("utf-8")), dtype=torch.uint8)
    tensors = {"tokens": rows.tokens.to(torch.int32), "texts_utf8": blob}
    if rows.has_teacher:
        tensors.update(teacher_ids=rows.teacher_ids.to(torch.int32), teacher_logp=rows.teacher_logp)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors, metadata={"settings": json.dumps(settings, sort_keys=True),
                                          "model": json.dumps(ident, sort_keys=True, default=str),
                                          "vocab": str(rows.vocab)})


def _read_cache(path: Path, teacher_topk: int) -> Any:
    """The cached :class:`~acip.train.data.TokenRows`, or None (with a warning naming the file) when the
    file fails its checksums or lacks the teacher's top-``teacher_topk`` it is keyed by."""
    import warnings

    from acip.core.io import ArtifactError, read_tensors

    from .data import TokenRows

    try:
        tensors, meta = read_tensors(path, what="self-generated data cache")  # sha256 of every tensor checked
        texts = json.loads(tensors["texts_utf8"].numpy().tobytes().decode("utf-8"))
        ids, logp = (tensors["teacher_ids"], tensors["teacher_logp"]) if teacher_topk else (None, None)
        vocab = meta.get("vocab")
        return TokenRows(texts, tensors["tokens"].long(), ids, logp, None if vocab in (None, "None") else vocab)
    except (ArtifactError, KeyError, ValueError) as e:
        warnings.warn(f"the self-generated data cache {str(path)!r} is damaged ({e}); sampling it again")
        return None


def _generate(model: Any, tok: Any, s: Mapping[str, Any], progress: bool) -> tuple[torch.Tensor, ...]:
    """All batches of :func:`self_generated`; ``(tokens, prefix_len, teacher_ids, teacher_logp)`` (the last
    two None unless ``s["teacher_topk"]``). Deterministic in ``s["seed"]``."""
    from tqdm.auto import tqdm

    model.eval()
    n, L, B = int(s["num_sequences"]), int(s["seq_len"]), int(s["batch_size"])
    nb = math.ceil(n / B)
    n_prompted = int(round(nb * float(s["prompt_fraction"])))
    prompted = set(random.Random(int(s["seed"])).sample(range(nb), n_prompted))
    chat = s["seed_text"] == "chat"
    if chat and n_prompted:  # every prompted row opens a user turn of the chat template (no BOS of ours)
        opening = chat_prompt(tok)
        if len(opening) >= L - 1:
            raise ValueError(f"the chat template's opening is {len(opening)} tokens, too long for data.seq_len={L}")
        prompts = [opening] * (n_prompted * B)
    else:
        prompts = seed_prompts(tok, _seed_texts(s["seed_text"]), n_prompted * B, int(s["prompt_tokens"]),
                               int(s["seed"])) if n_prompted else []
    bos = _bos(tok, model)
    g = torch.Generator().manual_seed(int(s["seed"]))
    rows, plen, tids, tlogp, used = [], [], [], [], 0
    K = int(s.get("teacher_topk", 0))
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
            prefix = body if chat else torch.cat([torch.full((rb, 1), bos, dtype=torch.long), body], dim=1)
        else:
            prefix = torch.full((rb, 1), bos, dtype=torch.long)
        out = sample_tokens(model, prefix, L - prefix.shape[1], float(s["temperature"]), float(s["top_p"]),
                            int(s["top_k"]), generator=g, cache=str(s["kv_cache"]), on_step=step, record_topk=K)
        if K:
            out, ids, logp = out
            tids.append(ids)
            tlogp.append(logp)
        rows.append(out)
        # the text starts after BOS (the prompt is kept); a chat row at its template (0: special tokens kept)
        plen.append(torch.full((rb,), 0 if chat and b in prompted else 1, dtype=torch.long))
    bar.close()
    return torch.cat(rows), torch.cat(plen), torch.cat(tids) if K else None, torch.cat(tlogp) if K else None


# ------------------------------------------------------------------------------------------ mixtures
def mix(components: Mapping[str, Any], seed: int = 0,
        max_chars: int | None = None) -> tuple["LabeledTexts", "LabeledTexts"]:
    """A weighted mixture of data groups: ``components = {name: {weight: w, data: <data node>}}``.

    Each component's training texts are shuffled (seeded) and cut so that the characters of the
    components stand in the ratio of their weights, as large as the scarcest component allows (and
    at most ``max_chars`` in all); the union is shuffled again. The held-out part is the union of
    every component's held-out texts (each the validation split of that training data). Both are
    :class:`~acip.train.data.LabeledTexts`: every text carries its component's name, so the run's
    validation split is also measured component by component (the adapters per ratio are chosen
    for every component, :mod:`acip.export.auto`).
    """
    from hydra.utils import instantiate

    from .data import LabeledTexts

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
    train_out: list[tuple[str, str]] = []  # (text, component)
    heldout_out: list[tuple[str, str]] = []
    for name, (w, tr, ho) in parts.items():
        order = list(range(len(tr)))
        rng.shuffle(order)
        budget, used = scale * w / total_w, 0
        for i in order:
            if used >= budget:
                break
            train_out.append((tr[i], name))
            used += len(tr[i])
        heldout_out += [(t, name) for t in ho]
    rng.shuffle(train_out)
    return (LabeledTexts([t for t, _ in train_out], [n for _, n in train_out]),
            LabeledTexts([t for t, _ in heldout_out], [n for _, n in heldout_out]))
