"""Evaluation: held-out perplexity (full-sequence and through the compressed cache), realized
compression with a heatmap, a long-context key-value recall probe, RULER-style long-context tasks,
and token-by-token perplexity/recall through any cache (eviction baselines change what later tokens
see, so they need it). ``dmc.eval.harness`` (the lm-evaluation-harness plugin,
``pip install 'dmc[eval]'``) is not imported here."""

from .perplexity import PerplexityResult, perplexity
from .recall import recall_probe
from .report import compression_heatmap, compression_report
from .ruler import make_ruler_trials, ruler_eval
from .streaming import streaming_perplexity, streaming_recall_probe

__all__ = ["PerplexityResult", "compression_heatmap", "compression_report", "make_ruler_trials", "perplexity",
           "recall_probe", "ruler_eval", "streaming_perplexity", "streaming_recall_probe"]
