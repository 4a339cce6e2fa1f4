"""``EngineConfig``: every setting of :class:`dmc.LLM` that is a plain value, in one frozen dataclass.

The engine flags of ``dmc generate``, ``dmc bench`` and ``dmc serve`` are generated from its fields
(:mod:`dmc.cli._engine_args`: the flag is the field's name, its type the annotation, its default the field's,
its help the field's ``help`` metadata), and ``dmc serve`` hands one to its engine process. This module
imports no torch, so that building a parser stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# "auto" (the model dtype) and these: the names of dmc.engine.llm.KV_CACHE_DTYPES, spelt out (no torch here).
KV_CACHE_DTYPE_NAMES = ("fp8",)
EVICTION_METHODS = ("h2o", "tova", "snapkv")  # dmc.baselines.eviction.METHODS (that module imports torch)


def _flag(help: str, **argparse_options) -> dict:
    """Field metadata of a setting that is a CLI flag: its help line (the default is appended by the
    commands' help formatter unless the line tells it) and options such as ``choices`` or ``metavar``."""
    return {"help": help, **argparse_options}


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings. ``LLM(model, config=EngineConfig(...))`` and ``LLM(model, max_num_seqs=8, ...)``
    are the same engine: the keywords build this (:meth:`replace`). Checked by :meth:`validate` (the values
    alone; what needs the model, e.g. the eviction budget against its context, is checked by ``LLM``).

    Attributes:
        dtype: "auto" (bf16 on CUDA, fp32 on CPU; a loaded model keeps its own), "bfloat16", "float16",
            "float32" (or a ``torch.dtype``).
        device: "cuda" if available, else "cpu".
        max_model_len: longest sequence (prompt + generation); default the model's context.
        max_num_seqs: most sequences decoded together.
        gpu_memory_utilization: share of the GPU's memory the engine may fill (weights
            included); the KV pool gets what is left after weights and activations.
        kv_cache_memory: bytes for the page pool, overriding the above (the CLI takes GiB). CPU default:
            what ``max_num_seqs`` sequences of ``max_model_len`` tokens can use, at most
            ``CPU_KV_CACHE_FRACTION`` of the memory available after loading the model and at most
            ``CPU_KV_CACHE_CAP`` bytes.
        kv_cache_dtype: the page pools' dtype: "auto" (the model dtype) or "fp8" (e4m3, 1 byte an element:
            the same ``kv_cache_memory`` holds twice the pages of bf16), with a k and a v scale per (layer,
            KV head): 1.0 (e4m3 spans ±448) unless ``kv_scales`` or :meth:`LLM.calibrate_kv_scales` sets them
            (:mod:`dmc.engine.kv_scales`). Only the stored slots are quantised:
            the DMC window state and the delayed-merging ring stay in fp32 / the model dtype, so merges sum
            exact values; attention inside a prefill chunk uses the chunk's exact keys.
        kv_scales: fp8 scales (a :class:`~dmc.engine.kv_scales.KVScales` or the path of one saved by
            :meth:`KVScales.save`); only with ``kv_cache_dtype="fp8"``.
        prefill_chunk: most prompt tokens prefilled per engine step, in one forward: the chunks of several
            requests share it (a longer prompt is prefilled in chunks over several steps).
        max_num_batched_tokens: the tokens one engine step may process, decode and prefill together (chunked
            prefill, as vLLM's option of that name): the step's decoding requests count first, prefill gets what
            is left (at most ``prefill_chunk``), so that arriving prompts cannot stall the running ones for
            long. A prompt that fits ``prefill_chunk`` is not split (its rest would take the slower
            continuation path): it waits for a step with room, or runs whole as a step's only new chunk.
            None: prefill gets ``prefill_chunk`` tokens whatever decodes (the best offline throughput).
            At least ``max_num_seqs``.
        prefill_delay_factor: while requests run, a new prompt waits until the oldest waiting one has waited this
            many times the last prefill forward's time (or the waiting prompts fill the step's prefill budget), so
            that one forward prefills several prompts: a forward's cost is mostly fixed when its tokens are few
            (small models: the host's launches), and prompts arriving one by one would each pay it alone while
            the running requests wait. 0 (default): admit at once. vLLM's ``scheduler_delay_factor``.
        vanilla: run a DMC model with every token appending (its uncompressed baseline).
        cuda_graphs: capture the decode step in batch-size buckets (CUDA only).
        eviction, eviction_budget, eviction_recent, eviction_window, eviction_pooling, eviction_kernel: an H2O,
            TOVA or SnapKV baseline (spec §8) and its :class:`~dmc.baselines.EvictionPolicy` settings (method,
            budget, recent, window, pooling, kernel; see there): at most ``eviction_budget`` slots per (layer,
            sequence, KV head), evicted for real (:mod:`dmc.engine.eviction`). The model runs uncompressed: a
            plain model, or a DMC one with ``vanilla=True``. Decode steps are slower than plain ones (the
            slots' attention probabilities are recomputed in PyTorch). ``LLM(eviction=policy)`` takes a policy.
        admission_margin: admit assuming the observed CR divided by (1 + margin).
        prefill_attention: attention of a prompt's first chunk: "auto" (flex on CUDA, sdpa on CPU),
            "flex" (FlexAttention with the DMC mask, compiled once per power-of-two length bucket),
            "sdpa" (a boolean DMC mask, no compilation, slower) or "dense".
        forced_period: benchmarks only (``--forced-cr``): replace the decision channel by
            α_t = 1[t % period != 0] so that random weights compress at exactly CR = period.
        seed: draws the seeds of requests that do not give one.
        enable_prefix_caching: keep the cache row's state after the longest 64-token boundary of each prompt (a
            copy no request runs), so that a later prompt starting with the same tokens (a chat's system prompt
            and history, resent every turn) prefills only the rest; the outputs are the same as without it
            (:mod:`dmc.engine.prefix_cache`). The copies use free rows and pages and are dropped, least recently
            used first, whenever a request needs them. Off by default; not with ``eviction`` or ``forced_period``.
    """

    # Flags, in the order ``--help`` lists them (kv_cache_memory and cuda_graphs have flags of their own
    # spelling, --kv-cache-memory-gib and --no-cuda-graphs: dmc.cli._engine_args adds those).
    dtype: str = field(default="auto", metadata=_flag("auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32"))
    device: str | None = field(default=None, metadata=_flag("cuda, cuda:N or cpu (default: cuda if available)"))
    max_model_len: int | None = field(default=None, metadata=_flag(
        "longest prompt + generation in tokens, >= 2 (default: the model's context)"))
    max_num_seqs: int = field(default=256, metadata=_flag("most sequences decoded together"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_flag(
        "share of the GPU's memory the engine may fill, weights included (CUDA only)"))
    kv_cache_memory: int | None = None
    kv_cache_dtype: str = field(default="auto", metadata=_flag(
        "page pool dtype: auto (the model dtype) or fp8 (e4m3 pages, a scale per layer and KV head, 1.0 unless "
        "--kv-scales: twice the pages in the same memory; the DMC window state stays exact)",
        choices=["auto", *KV_CACHE_DTYPE_NAMES]))
    kv_scales: str | None = field(default=None, metadata=_flag(
        "fp8 scales per (layer, KV head), a safetensors file saved by LLM.calibrate_kv_scales(prompts).save(PATH) "
        "(needs --kv-cache-dtype fp8)", metavar="PATH"))
    prefill_chunk: int = field(default=4096, metadata=_flag(
        "most prompt tokens prefilled in one engine step (one forward; the chunks of several prompts share it, a "
        "longer prompt goes over several steps)"))
    max_num_batched_tokens: int | None = field(default=None, metadata=_flag(
        "tokens one engine step may process, decode and prefill together: decoding requests count first, prefill "
        "gets the rest (at most --prefill-chunk), so arrivals cannot stall running requests for long; >= "
        "--max-num-seqs (default: none, prefill gets --prefill-chunk whatever decodes; dmc serve: 2048)"))
    prefill_delay_factor: float = field(default=0.0, metadata=_flag(
        "while requests run, a new prompt waits until the oldest waiting one has waited this many times the last "
        "prefill forward's time (or the waiting prompts fill the step's budget), so that one forward prefills "
        "several (small models: a forward's cost is mostly fixed); 0 = admit at once (default)"))
    vanilla: bool = field(default=False, metadata=_flag("run a DMC model uncompressed (every token appends)"))
    cuda_graphs: bool = True
    eviction: str | None = field(default=None, metadata=_flag(
        "the fixed-budget eviction baselines (spec §8), run on the uncompressed model (a plain model, or a DMC one "
        "with --vanilla); needs --eviction-budget", choices=list(EVICTION_METHODS)))
    eviction_budget: int | None = field(default=None, metadata=_flag(
        "slots kept per (layer, sequence, KV head); DMC's slot count at CR c over n tokens is ceil(n / c)"))
    eviction_recent: int | None = field(default=None, metadata=_flag(
        "H2O's protected recent window (default: half the budget)"))
    eviction_window: int | None = field(default=None, metadata=_flag(
        "SnapKV's observation window: the last queries that score the slots, and the newest slots always kept "
        "(default: 32, at most half the budget)"))
    enable_prefix_caching: bool = field(default=False, metadata=_flag(
        "keep the compressed state after each prompt's longest 64-token boundary, so that a prompt starting with "
        "the same tokens (a chat's history) prefills only the rest; same outputs; not with --eviction or "
        "--forced-cr (default: off)"))
    # Python only (or a flag of some commands: --forced-cr, dmc serve's --seed).
    eviction_pooling: str = "max"
    eviction_kernel: int = 7
    admission_margin: float = 0.1
    prefill_attention: str = "auto"
    forced_period: int = 0
    seed: int = 0

    def replace(self, **settings) -> EngineConfig:
        """This config with ``settings`` changed (the keywords of ``LLM``); ``eviction`` may be an
        :class:`~dmc.baselines.EvictionPolicy`, which sets every ``eviction_*`` field. TypeError for a
        name that is no setting."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown engine setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"the settings are the fields of EngineConfig: {', '.join(sorted(names))}")
        policy = settings.get("eviction")
        if policy is not None and not isinstance(policy, str):
            # A policy has filled in the defaults of the other methods' settings: keep its method's own only.
            settings.update(eviction=policy.method, eviction_budget=policy.budget,
                            eviction_recent=policy.recent if policy.method == "h2o" else None,
                            eviction_window=policy.window if policy.method == "snapkv" else None,
                            eviction_pooling=policy.pooling, eviction_kernel=policy.kernel)
        return dataclasses.replace(self, **settings)

    def eviction_policy(self):
        """The :class:`~dmc.baselines.EvictionPolicy` of the ``eviction*`` settings, or None (it checks the
        numbers: ValueError for a budget below 1 slot, a window beyond it, ...)."""
        if self.eviction is None:
            return None
        from ..baselines.eviction import EvictionPolicy
        return EvictionPolicy(self.eviction, budget=self.eviction_budget, recent=self.eviction_recent,
                              window=self.eviction_window, pooling=self.eviction_pooling, kernel=self.eviction_kernel)

    def validate(self, *, flags: bool = False) -> None:
        """ValueError for a setting that cannot work, whatever the model. The message names the Python
        argument, with the CLI flag after it where there is one; ``flags=True`` (the commands) names the
        flags alone, the user having typed those (and leaves out the types argparse has already enforced)."""
        name = (lambda setting: flag_of(setting) or setting) if flags else (lambda setting: setting)

        def refuse(setting: str, requirement: str, kind: str = "") -> None:
            flag = flag_of(setting)
            text = f"{name(setting)} must be {kind + ' ' if kind and not flags else ''}{requirement}"
            raise ValueError(text if flags or flag is None else f"{text} ({flag})")

        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPE_NAMES:
            refuse("kv_cache_dtype", f"'auto' (the model dtype) or one of {', '.join(KV_CACHE_DTYPE_NAMES)}, got "
                                     f"{self.kv_cache_dtype!r}")
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 2):
            refuse("max_model_len", f">= 2 (a prompt token and a generated one), got {self.max_model_len!r}",
                   "an integer")
        if not _is_int(self.max_num_seqs) or self.max_num_seqs < 1:
            refuse("max_num_seqs", f">= 1, got {self.max_num_seqs!r}", "an integer")
        if not _is_number(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            refuse("gpu_memory_utilization", f"in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_cache_memory is not None and (not _is_number(self.kv_cache_memory) or self.kv_cache_memory <= 0):
            refuse("kv_cache_memory", f"a positive number of bytes, got {self.kv_cache_memory!r}")
        if self.kv_scales is not None and self.kv_cache_dtype != "fp8":
            raise ValueError("--kv-scales are the scales of an fp8 cache: add --kv-cache-dtype fp8" if flags else
                             "kv_scales are the scales of an fp8 cache: pass kv_cache_dtype='fp8' with them")
        if not _is_int(self.prefill_chunk) or self.prefill_chunk < 1:
            refuse("prefill_chunk", f">= 1, got {self.prefill_chunk!r}", "an integer")
        if self.max_num_batched_tokens is not None and (not _is_int(self.max_num_batched_tokens)
                                                        or self.max_num_batched_tokens < self.max_num_seqs):
            refuse("max_num_batched_tokens", f">= {name('max_num_seqs')} ({self.max_num_seqs}): every decoding "
                                             f"sequence takes one token of a step; got {self.max_num_batched_tokens!r}",
                   "an integer")
        if not _is_number(self.prefill_delay_factor) or not self.prefill_delay_factor >= 0:
            refuse("prefill_delay_factor", f">= 0 (0: off), got {self.prefill_delay_factor!r}", "a number")
        if not _is_number(self.admission_margin) or not self.admission_margin > -1:
            refuse("admission_margin", f"> -1, got {self.admission_margin!r}", "a number")
        if self.prefill_attention not in ("auto", "flex", "sdpa", "dense"):
            refuse("prefill_attention", f"auto, flex, sdpa or dense, got {self.prefill_attention!r}")
        if not _is_int(self.forced_period) or self.forced_period < 0:
            refuse("forced_period", f">= 0 (0: off), got {self.forced_period!r}", "an integer")
        if self.vanilla and self.forced_period:
            raise ValueError(f"{name('vanilla')}{'' if flags else '=True'} and {name('forced_period')} are "
                             "exclusive (vanilla never merges)")
        self._validate_eviction(name)

    def _validate_eviction(self, name) -> None:
        """The eviction settings go together (a method and its budget; a window only of the method that
        has one); :class:`~dmc.baselines.EvictionPolicy` checks the numbers."""
        methods = "|".join(EVICTION_METHODS)
        if self.eviction is None:
            for setting in ("eviction_budget", "eviction_recent", "eviction_window"):
                if getattr(self, setting) is not None:
                    raise ValueError(f"{name(setting)} needs {name('eviction')} {methods}")
            return
        display = {"h2o": "H2O", "tova": "TOVA", "snapkv": "SnapKV"}.get(self.eviction, self.eviction)
        if self.eviction_budget is None:
            raise ValueError(f"{name('eviction')} needs {name('eviction_budget')} N (slots kept per layer, sequence "
                             "and KV head)")
        if self.eviction_recent is not None and self.eviction != "h2o":
            raise ValueError(f"{name('eviction_recent')} is H2O's recent window; {display} has none")
        if self.eviction_window is not None and self.eviction != "snapkv":
            raise ValueError(f"{name('eviction_window')} is SnapKV's observation window; {display} has none")
        self.eviction_policy()


# The flags that are spelt otherwise than their setting (or in some commands only).
_FLAG_SPELLINGS = {"kv_cache_memory": "--kv-cache-memory-gib", "cuda_graphs": "--no-cuda-graphs",
                   "forced_period": "--forced-cr"}


def flag_of(setting: str) -> str | None:
    """The CLI flag of an EngineConfig field, or None for a Python-only setting."""
    if setting in _FLAG_SPELLINGS:
        return _FLAG_SPELLINGS[setting]
    spec = next(f for f in dataclasses.fields(EngineConfig) if f.name == setting)
    return "--" + setting.replace("_", "-") if "help" in spec.metadata else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
