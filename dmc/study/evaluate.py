"""Held-out evaluation of every model of a study, all alike, with :mod:`dmc.eval`.

- Stock models (the original, plain continued training, GQA): full-sequence perplexity.
- DMC: perplexity and realized CR through the compressed cache (hard decisions: what inference
  computes and keeps), and the same windows in training mode (relaxed decisions, seeded noise):
  their loss gap is what hard decisions cost at inference.
- H2O / TOVA: the stock model converted and run in vanilla mode, token by token through an
  eviction cache of ``budget`` slots per KV head (:func:`dmc.eval.streaming.streaming_perplexity`;
  a parallel pass would hide eviction).

Every model sees the same windows: the held-out documents in a fixed shuffled order (so a few
windows sample all of them), cut into non-overlapping windows of ``seq_len`` tokens.
"""

from __future__ import annotations

import os
import pathlib
import random
import sys
import time

import torch

from .settings import StudySettings


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type.upper()} ({os.cpu_count()} cores)"


class Evaluator:
    def __init__(self, s: StudySettings, heldout_files: list[pathlib.Path], seq_len: int) -> None:
        import transformers

        from ..train.data import read_text_files, skipped_line
        self.s, self.seq_len = s, seq_len
        self.device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, s.eval_dtype)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(s.model)
        text_field = s.train.get("text_field", "text")
        self.texts, skipped = read_text_files(heldout_files, text_field)
        if skipped:
            print(f"warning: held-out data: {skipped_line(skipped, len(heldout_files))}", file=sys.stderr)
        random.Random(0).shuffle(self.texts)
        self._evict_models: dict[str, torch.nn.Module] = {}
        self._evictions: dict[tuple[str, str, int], dict] = {}

    def settings(self) -> dict:
        return {"seq_len": self.seq_len, "max_windows": self.s.eval_windows, "batch_size": self.s.eval_batch_size}

    def load(self, path: pathlib.Path):
        import transformers

        import dmc  # noqa: F401 - registers the DMC model types
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        return model.to(self.device).eval()

    def _row(self, result, started: float) -> dict:
        return {"loss": result.loss, "perplexity": result.perplexity, "eval_tokens": result.tokens,
                "eval_windows": result.windows, "eval_seconds": round(time.time() - started, 2),
                "device": device_name(self.device)}

    def stock(self, path: pathlib.Path, original_kv_heads: int) -> dict:
        from ..eval import perplexity
        started = time.time()
        model = self.load(path)
        result = perplexity(model, self.tokenizer, self.texts, mode="full", **self.settings())
        kv_heads = model.config.num_key_value_heads
        del model
        return {**self._row(result, started), "realized_cr": original_kv_heads / kv_heads, "kv_heads": kv_heads}

    def dmc(self, path: pathlib.Path) -> dict:
        from ..eval import compression_report, perplexity
        started = time.time()
        model = self.load(path)
        hard = perplexity(model, self.tokenizer, self.texts, mode="cache", **self.settings())
        relaxed = perplexity(model, self.tokenizer, self.texts, mode="relaxed", **self.settings())
        del model
        return {**self._row(hard, started), "realized_cr": hard.compression.overall_cr,
                "loss_relaxed": relaxed.loss, "perplexity_relaxed": relaxed.perplexity,
                "relaxed_gap": hard.loss - relaxed.loss, "compression": compression_report(hard.compression)}

    def eviction(self, base: pathlib.Path, method: str, budget: int) -> dict:
        from ..baselines import EvictionCache, EvictionPolicy
        from ..eval.streaming import streaming_perplexity
        from ..hf.convert import convert
        started = time.time()
        key = str(base)
        if (key, method, budget) in self._evictions:  # e.g. a matched budget equal to another CR's
            return self._evictions[key, method, budget]
        if key not in self._evict_models:  # H2O and TOVA at every budget share one converted model
            self._evict_models = {key: convert(self.load(base)).to(self.device).eval()}
            self._evict_models[key].set_dmc_mode(vanilla=True)  # the original attention; the cache evicts
        model = self._evict_models[key]

        def cache(context: int):
            return EvictionCache(model.config, EvictionPolicy(method, budget=budget))

        result = streaming_perplexity(model, self.tokenizer, self.texts, cache, **self.settings())
        row = {**self._row(result, started), "realized_cr": result.compression.overall_cr, "budget": budget}
        self._evictions[key, method, budget] = row
        return row
