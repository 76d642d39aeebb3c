"""Evaluation: perplexity and ratio sweeps (with tables and plots)."""
from .perplexity import perplexity, token_windows
from .sweep import format_table, plot_ratio_curves, ratio_sweep

__all__ = ["perplexity", "token_windows", "ratio_sweep", "format_table", "plot_ratio_curves"]
