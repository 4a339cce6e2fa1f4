"""lm-evaluation-harness plugin: ``--model dmc`` evaluates DMC (and plain) HF model directories
and records the realized compression ratio with every result.

Importing this module registers the model name ``dmc`` with lm-eval (``register_model``). lm-eval
0.4.13 reads no entry points, so ``dmc-lm-eval`` is its command line with this module imported
first; releases with entry-point discovery (upstream PR #4013, after 0.4.13) find the
``lm_eval.models`` entry point in pyproject.toml and take ``lm-eval --model dmc`` (docs/lm_eval.md).

Modes (spec §2-3): ``loglikelihood`` and ``loglikelihood_rolling`` run the full-sequence forward
with hard decisions (no cache; it equals the compressed cache, spec §7.3): CR is counted from the
decisions over each row's real tokens. ``generate_until`` decodes through a :class:`DMCCache`: CR
is the cache's tokens / kept slots. Both are tallied per (task, request type) and end up in the
results under ``config.dmc_compression`` (lm-eval merges ``get_model_info()`` into ``config``,
which it prints with ``--show_config`` and writes with ``--output_path``), and in the log.
"""

from __future__ import annotations

import logging

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # lm-eval (and accelerate, which HFLM needs) come with the eval extra
    raise ImportError(f"dmc.eval.harness needs lm-eval with its HF backend ({e}): pip install 'dmc[eval]'") from e

from ..config import is_dmc
from ..hf.cache import DMCCache
from ..stats import CompressionStats

# A child of lm-eval's logger: its CLI shows these lines with its own.
logger = logging.getLogger("lm_eval.models.dmc")

MODES = {"loglikelihood": "full-sequence", "loglikelihood_rolling": "full-sequence", "generate_until": "cache"}


@register_model("dmc")
class DMCLM(HFLM):
    """lm-eval's HF model with DMC support: ``pretrained`` is a local DMC model directory (from
    ``dmc retrofit`` or ``dmc import-megatron``), or any plain HF causal LM (then nothing is
    compressed and ``dmc_compression`` says so). Every other ``model_args`` key is HFLM's."""

    def __init__(self, pretrained, backend: str = "causal", **kwargs) -> None:
        import dmc  # noqa: F401 - registers the DMC model types with transformers' Auto classes
        super().__init__(pretrained=pretrained, backend=backend, **kwargs)
        config = self.model.config
        self.is_dmc = is_dmc(config)
        self._shape = (config.num_hidden_layers, config.num_key_value_heads)
        self._tallies: dict[tuple[str, str], torch.Tensor] = {}  # (task, request type) -> [2, layers, H]
        self._tally: torch.Tensor | None = None  # the tally being filled: tokens, slots per (layer, head)
        self._decisions: torch.Tensor | None = None  # [B, layers, H, L] of the last full-sequence batch
        self._row = 0

    # ------------------------------------------------------------------ request types (lm-eval's API)
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._tallied("loglikelihood", requests, lambda rs: super(DMCLM, self).loglikelihood(rs, disable_tqdm))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._tallied("loglikelihood_rolling", requests,
                             lambda rs: super(DMCLM, self).loglikelihood_rolling(rs, disable_tqdm))

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._tallied("generate_until", requests,
                             lambda rs: super(DMCLM, self).generate_until(rs, disable_tqdm))

    def _tallied(self, request_type: str, requests, run):
        """Run ``requests`` task by task, tallying tokens and slots per (task, request type)."""
        if not self.is_dmc:
            return run(requests)
        groups: dict[str, list[int]] = {}
        if self.world_size > 1:  # HFLM synchronises the ranks inside a call: one call for all tasks
            groups["all tasks"] = list(range(len(requests)))
        else:
            for i, request in enumerate(requests):
                groups.setdefault(getattr(request, "task_name", None) or "unnamed", []).append(i)
        results = [None] * len(requests)
        for task, indices in groups.items():
            self._tally = torch.zeros(2, *self._shape, dtype=torch.float64)
            for i, result in zip(indices, run([requests[i] for i in indices]), strict=True):
                results[i] = result
            tally = self._tally
            if self.world_size > 1:
                tally = self.all_gather(tally.to(self.device)[None]).sum(0).cpu()
            key = (task, request_type)
            self._tallies[key] = self._tallies.get(key, 0) + tally
            summary = self._summary(tally)
            logger.info("DMC realized CR %.3f on %s (%s, %s mode, %d tokens per head)", summary["cr"], task,
                        request_type, MODES[request_type], summary["tokens"])
        self._tally = self._decisions = None
        return results

    # ------------------------------------------------------------------ the model calls
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Full-sequence forward (no cache, hard decisions); keeps the decisions so that each
        row's real tokens can be counted when HFLM cuts its padding off."""
        if not self.is_dmc or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            out = self.model(inps, use_cache=False)
        self._decisions, self._row = out.decisions, 0
        return out.logits

    def _select_cont_toks(self, logits: torch.Tensor, contlen: int | None = None, inplen: int | None = None):
        # HFLM calls this once per row of the last _model_call batch, in order, with the row's
        # unpadded length: the decisions of those tokens are the row's (right padding comes after
        # them and, the model being causal, changes nothing before it).
        if self._tally is not None and self._decisions is not None and inplen and self._row < len(self._decisions):
            alpha = self._decisions[self._row, :, :, :inplen].double().cpu()  # [layers, H, inplen]
            self._tally[0] += inplen
            self._tally[1] += (1 - alpha).sum(-1)
            self._row += 1
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """Decoding through a DMC cache: the tally counts what the cache really kept."""
        if not self.is_dmc:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        cache = DMCCache(self.model.config)
        out = super()._model_generate(context, max_length, stop, past_key_values=cache, **generation_kwargs)
        if self._tally is not None:
            stats = CompressionStats.from_cache(cache)  # [layers, B, H]
            self._tally[0] += stats.tokens.sum(1).cpu()
            self._tally[1] += stats.slots.sum(1).cpu()
        return out

    # ------------------------------------------------------------------ reporting
    @staticmethod
    def _summary(tally: torch.Tensor) -> dict:
        stats = CompressionStats(tokens=tally[0][:, None], slots=tally[1][:, None])
        return {**stats.summary(), "tokens": int(tally[0, 0, 0]), "slots": round(float(tally[1].sum()), 3)}

    def compression_report(self) -> dict:
        """Realized compression of everything evaluated so far.

        ``cr`` = tokens / slots summed over layers and KV heads (what cache memory follows);
        ``tokens`` counts tokens per head, ``slots`` the slots kept by all heads together. Keys:
        ``by_task[task][request type]`` and ``overall[mode]``, mode being "full-sequence"
        (loglikelihood requests, teacher-forced, no cache) or "cache" (generation).
        """
        if not self.is_dmc:
            return {"is_dmc": False, "note": "not a DMC model: nothing is compressed"}
        by_task: dict[str, dict] = {}
        by_mode: dict[str, torch.Tensor] = {}
        for (task, request_type), tally in self._tallies.items():
            mode = MODES[request_type]
            by_task.setdefault(task, {})[request_type] = {"mode": mode, **self._summary(tally)}
            by_mode[mode] = by_mode.get(mode, 0) + tally
        return {"is_dmc": True, "target_cr": self.model.config.dmc.get("target_cr"),
                "overall": {mode: self._summary(t) for mode, t in by_mode.items()}, "by_task": by_task}

    def get_model_info(self) -> dict:
        """HFLM's model info plus ``dmc_compression`` (lm-eval stores it under ``results["config"]``)."""
        info = super().get_model_info()
        info["dmc_compression"] = self.compression_report()
        return info


def cli_evaluate() -> None:
    """``dmc-lm-eval``: lm-eval's command line, with ``--model dmc`` registered (lm-eval 0.4.13
    reads no entry points, so its own ``lm-eval`` command does not know ``dmc``)."""
    from lm_eval.__main__ import cli_evaluate as lm_eval_cli
    lm_eval_cli()


__all__ = ["DMCLM", "cli_evaluate"]
