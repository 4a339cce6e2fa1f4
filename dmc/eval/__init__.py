"""Evaluation: held-out perplexity (full-sequence and through the compressed cache), realized
compression with a heatmap, a long-context key-value recall probe, and token-by-token perplexity/recall
through any cache (eviction baselines change what later tokens see, so they need it). ``dmc.eval.harness`` (the
lm-evaluation-harness plugin, ``pip install 'dmc[eval]'``) is not imported here."""

from .perplexity import PerplexityResult, perplexity
from .recall import recall_probe
from .report import compression_heatmap, compression_report
from .streaming import streaming_perplexity, streaming_recall_probe

__all__ = ["PerplexityResult", "compression_heatmap", "compression_report", "perplexity", "recall_probe",
           "streaming_perplexity", "streaming_recall_probe"]
