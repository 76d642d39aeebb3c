"""Perplexity over non-overlapping token windows."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["perplexity", "token_windows"]


def token_windows(tokenizer: Any, texts: Sequence[str], seq_len: int = 256, max_windows: int | None = None) -> torch.Tensor:
    """Join ``texts`` with newlines, tokenize once (no BOS), cut into ``(n, seq_len)`` windows.

    The trailing partial window is dropped, so every window is full length.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("texts is empty: pass a list of strings to evaluate on")
    ids: list[int] = []
    need = None if max_windows is None else max_windows * seq_len
    chunk = 512
    for i in range(0, len(texts), chunk):  # tokenize lazily: stop once enough tokens exist
        ids += tokenizer("\n".join(texts[i : i + chunk]) + "\n", add_special_tokens=False)["input_ids"]
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | torch.Tensor,
    seq_len: int = 256,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """``exp(mean NLL)`` of next-token prediction over non-overlapping windows of ``seq_len``.

    Every window is scored independently (no context carried over); all ``n * (seq_len - 1)``
    predicted tokens count equally. ``texts`` may also be a prepared ``(n, seq_len)`` id tensor.
    """
    from tqdm.auto import tqdm

    windows = texts if isinstance(texts, torch.Tensor) else token_windows(tokenizer, texts, seq_len, max_windows)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = windows[i : i + batch_size].to(device)
            logits = model(input_ids=batch).logits.float()
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count) if nll / count < 700 else float("inf")
