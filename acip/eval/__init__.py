"""Evaluation: perplexity, sizes, latency."""
from .perplexity import perplexity, token_windows

__all__ = ["perplexity", "token_windows"]
