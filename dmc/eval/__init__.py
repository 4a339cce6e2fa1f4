"""Evaluation: held-out perplexity (full-sequence and through the compressed cache), realized
compression with a heatmap, and a long-context key-value recall probe. ``dmc.eval.harness`` (the
lm-evaluation-harness plugin, ``pip install 'dmc[eval]'``) is not imported here."""

from .perplexity import PerplexityResult, perplexity
from .recall import recall_probe
from .report import compression_heatmap, compression_report

__all__ = ["PerplexityResult", "compression_heatmap", "compression_report", "perplexity", "recall_probe"]
