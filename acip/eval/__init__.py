"""Evaluation: perplexity, ratio sweeps (with tables and plots), held-out domains, the lm-eval hook."""
from .harness import lm_eval
from .perplexity import perplexity, token_windows
from .sweep import format_table, plot_domain_curves, plot_ratio_curves, ratio_sweep

__all__ = ["perplexity", "token_windows", "ratio_sweep", "format_table", "plot_ratio_curves", "plot_domain_curves",
           "lm_eval"]
