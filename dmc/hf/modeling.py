"""DMC models on Hugging Face architectures: Llama, Mistral, Qwen2 and Qwen3.

Each family gets a config (``model_type = "dmc_<family>"``, DMC settings in ``config.dmc``), a
base model and a causal LM, registered with ``AutoConfig``/``AutoModel``/
``AutoModelForCausalLM`` on ``import dmc``. The classes subclass the family's own, so weights,
names, the MLP, norms and RoPE are the family's; only attention and the decoder loop differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.mistral import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from .. import core
from ..config import DMCConfig
from ..stats import CompressionStats
from .attention import DMCAttention, DMCBatch
from .cache import DMCCache
from .runtime import DMCRuntime

@dataclass
class DMCModelOutput(BaseModelOutputWithPast):
    """Adds ``decisions`` ``[B, layers, H, n]`` (α per token; training: straight-through α̂) and
    ``valid`` ``[B, n]`` (False for padding)."""

    decisions: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    decision_logits: torch.Tensor | None = None  # eval mode: a per token ``[B, layers, H, n]``


@dataclass
class DMCCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` = ``lm_loss`` + ``compression_loss`` in training; ``compression`` holds the
    realized tokens/slots per (layer, sequence, head) of this forward."""

    lm_loss: torch.Tensor | None = None
    compression_loss: torch.Tensor | None = None
    target_cr: float | None = None
    decisions: torch.Tensor | None = None
    compression: CompressionStats | None = None
    decision_logits: torch.Tensor | None = None


def compile_decoder_layers(model, **compile_kwargs) -> None:
    """``torch.compile`` every decoder layer of ``model`` (a causal LM or its base model), so that
    all layers share one compiled graph per mode.

    DMC attention indexes the per-forward noise by ``layer_idx``; torch.compile treats integer
    module attributes as constants, so each layer would compile its own graph, and past the
    recompile limit (8) the remaining layers silently run eagerly, FlexAttention unfused: DMC
    training of an 8-layer model on an H100 was 10x slower than plain training. Making such ints
    dynamic gives one graph for every layer; the raised limit leaves room for the modes a run
    goes through (zero-out, retrofit, evaluation, the μ ramp)."""
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    base = getattr(model, "model", model)
    for layer in base.layers:
        layer.compile(**compile_kwargs)


def _document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    change = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.cat([torch.ones_like(change[:, :1]), change], dim=1)


class DMCModelMixin:
    """Decoder loop of a DMC base model (embeddings → DMC decoder layers → norm).

    ``dmc_runtime`` (a :class:`~dmc.hf.runtime.DMCRuntime`) is the one object holding the model's DMC
    config (parsed once) and its mode; every attention layer reads it by reference."""

    def __init__(self, config) -> None:
        super().__init__(config)  # the family's base model, then its attention replaced by DMC's
        self._install_dmc_attention()

    def _install_dmc_attention(self) -> None:
        # Runtime settings an older config.dmc still holds (attn_implementation, compile_pooling) become
        # the initial runtime and leave config.dmc, so that they are not saved again.
        self.dmc_runtime = DMCRuntime.from_dmc_dict(self.config.dmc)
        self.config.dmc = self.dmc_runtime.config.to_dict()
        for layer in self.layers:
            layer.self_attn = DMCAttention(layer.self_attn, self.config, self.dmc_runtime)

    @property
    def dmc_config(self) -> DMCConfig:
        """The DMC config every layer reads (``config.dmc``, parsed once)."""
        return self.dmc_runtime.config

    def set_dmc_config(self, config: DMCConfig) -> None:
        """Replace the model's DMC semantics (window, offset, logit scale, merge delay, ...): ``config.dmc``
        and the parsed config all layers read. Its runtime fields are ignored: see ``set_dmc_mode``."""
        self.dmc_runtime.config = DMCConfig.from_dict(config.to_dict())
        self.config.dmc = self.dmc_runtime.config.to_dict()

    def set_dmc_mode(self, vanilla: bool = False, channel_scale: float = 1.0, *,
                     attn_implementation: str | None = None, compile_pooling: bool | None = None) -> None:
        """See :meth:`DMCForCausalLMMixin.set_dmc_mode`."""
        changes = dict(vanilla=vanilla, channel_scale=channel_scale)
        if attn_implementation is not None:
            changes["attn_implementation"] = attn_implementation
        if compile_pooling is not None:
            changes["compile_pooling"] = compile_pooling
        self.dmc_runtime.update(**changes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DMCCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        document_ids: torch.LongTensor | None = None,
        dmc_generator: torch.Generator | None = None,
        dmc_noise_scale: float = 1.0,
        dmc_hard: bool = False,
        dmc_forced_period: int = 0,
        **kwargs: Any,
    ) -> DMCModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, n, _ = inputs_embeds.shape
        device = inputs_embeds.device

        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training:
            use_cache, past_key_values = False, None  # training runs full sequences
        if use_cache or past_key_values is not None:
            past_key_values = self._check_cache(past_key_values)

        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("DMC models take a 2D padding mask [batch, tokens]; their attention "
                                 "mask is computed from the decisions")
            chunk_mask = attention_mask[:, -n:].to(device=device, dtype=torch.bool)
            if not bool(chunk_mask.all()):
                valid = chunk_mask
        seen = (past_key_values.real_tokens_seen(b, device) if past_key_values is not None
                else torch.zeros(b, dtype=torch.long, device=device))
        valid_or_all = valid if valid is not None else torch.ones(b, n, dtype=torch.bool, device=device)
        real_before = seen[:, None] + valid_or_all.long().cumsum(-1) - valid_or_all.long()
        if past_key_values is not None and valid is not None and bool((~valid & (real_before > 0)).any()):
            raise ValueError("with a cache, padding must come before a sequence's first token (left padding); "
                             "for right-padded batches pass use_cache=False")
        starts = valid_or_all & (real_before == 0)  # a sequence's first real token always appends
        if document_ids is not None:
            starts = starts | _document_starts(document_ids)
        if position_ids is None:
            position_ids = real_before.clamp_min(0)

        runtime = self.dmc_runtime
        noise = None
        if self.training and not runtime.vanilla and not dmc_hard and dmc_noise_scale > 0:
            shape = (self.config.num_hidden_layers, b, self.config.num_key_value_heads, n)
            noise = core.logistic_noise(shape, dmc_generator, device=device)
            if dmc_noise_scale != 1.0:
                noise = noise * dmc_noise_scale
        batch = DMCBatch(valid=valid, starts=starts, document_ids=document_ids, vanilla=runtime.vanilla,
                         channel_scale=runtime.channel_scale, noise=noise, hard=dmc_hard,
                         forced_period=dmc_forced_period)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=None,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                dmc_batch=batch,
            )
        if past_key_values is not None:
            past_key_values.advance(valid_or_all)
        decisions, logits = [], []
        for layer in self.layers[: self.config.num_hidden_layers]:
            decisions.append(layer.self_attn.decisions)
            logits.append(layer.self_attn.decision_logits)
            layer.self_attn.decisions = layer.self_attn.decision_logits = None
        return DMCModelOutput(
            last_hidden_state=self.norm(hidden_states),
            past_key_values=past_key_values,
            decisions=torch.stack(decisions, dim=1),
            valid=valid,
            decision_logits=torch.stack(logits, dim=1) if all(x is not None for x in logits) else None,
        )

    def _check_cache(self, cache) -> DMCCache:
        if cache is None:
            return DMCCache(self.config)
        if isinstance(cache, DMCCache):
            return cache
        if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
            return DMCCache(self.config)  # an empty stock cache (e.g. made by a caller): swap it
        raise TypeError(f"DMC models need a dmc.DMCCache, got a filled {type(cache).__name__}; pass "
                        "past_key_values=None (one is created) or dmc.DMCCache(model.config)")


class DMCForCausalLMMixin:
    """Causal LM head over a DMC base model; adds the compression loss in training."""

    _dmc_base_model_class: type = None

    def __init__(self, config) -> None:
        # Skip the family's __init__ (it would build a non-DMC base model first).
        super(self._family_causal_lm_class, self).__init__(config)
        self.model = self._dmc_base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own DMCCache

    @property
    def dmc_config(self) -> DMCConfig:
        """The DMC config every layer reads (``config.dmc``, parsed once)."""
        return self.model.dmc_runtime.config

    @property
    def dmc_runtime(self) -> DMCRuntime:
        """The model's mode and runtime settings (:class:`~dmc.hf.runtime.DMCRuntime`), one object."""
        return self.model.dmc_runtime

    def set_dmc_config(self, config: DMCConfig) -> None:
        """Replace the model's DMC semantics (window, offset, logit scale, merge delay, ...): ``config.dmc``
        and the parsed config all layers read. Its runtime fields are ignored: see :meth:`set_dmc_mode`."""
        self.model.set_dmc_config(config)

    def set_dmc_mode(self, vanilla: bool = False, channel_scale: float = 1.0, *,
                     attn_implementation: str | None = None, compile_pooling: bool | None = None) -> None:
        """``vanilla=True``: plain attention (every token appends, channel D-1 kept and multiplied
        by ``channel_scale``), used by the zero-out stage and as the like-for-like baseline.

        ``attn_implementation`` ("auto", "flex", "dense", "sdpa") and ``compile_pooling``, when given,
        change those runtime settings too (None: unchanged). All of it is the model's one
        :attr:`dmc_runtime`; nothing is saved with the model."""
        self.model.set_dmc_mode(vanilla, channel_scale, attn_implementation=attn_implementation,
                                compile_pooling=compile_pooling)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DMCCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        document_ids: torch.LongTensor | None = None,
        dmc_target_cr: float | None = None,
        dmc_generator: torch.Generator | None = None,
        dmc_noise_scale: float = 1.0,
        dmc_hard: bool = False,
        dmc_forced_period: int = 0,
        dmc_two_sided: bool = False,
        **kwargs: Any,
    ) -> DMCCausalLMOutput:
        """As the family's forward, plus:

        Args:
            document_ids: ``[B, L]`` document of each token of a packed row: no merge and no
                attention across documents.
            dmc_target_cr: CR(s) for the compression loss (default: ``config.dmc.target_cr``).
            dmc_generator: RNG of the training-mode Gumbel noise.
            dmc_noise_scale: multiplier of that noise (the recipe anneals it to 0, so training
                ends with the decisions inference will take).
            dmc_hard: train with the inference forward (hard decisions, §3 mask; see
                :class:`~dmc.hf.attention.DMCBatch`).
            dmc_forced_period: benchmarks only (the engine's ``forced_period``): > 0 replaces the
                decision channel by α_t = 1[t % period != 0] (eval and cached forwards).
            dmc_two_sided: the compression loss also penalises compressing more than the target
                (:func:`~dmc.core.compression_loss`); the trainer's fixed-CR stages ask for it here,
                so that the loss is computed once.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            document_ids=document_ids, dmc_generator=dmc_generator, dmc_noise_scale=dmc_noise_scale,
            dmc_hard=dmc_hard, dmc_forced_period=dmc_forced_period,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        target_cr = dmc_target_cr if dmc_target_cr is not None else self.dmc_config.target_cr
        lm_loss = cr_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if target_cr is not None and not self.model.dmc_runtime.vanilla:
            cr_loss = core.compression_loss(outputs.decisions, target_cr, outputs.valid, two_sided=dmc_two_sided,
                                             merge_delay=self.dmc_config.merge_delay)
        loss = lm_loss
        if lm_loss is not None and cr_loss is not None and self.training:
            loss = lm_loss + cr_loss
        return DMCCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            lm_loss=lm_loss,
            compression_loss=cr_loss,
            target_cr=target_cr,
            decisions=outputs.decisions,
            compression=CompressionStats.from_decisions(outputs.decisions, outputs.valid,
                                                         self.dmc_config.merge_delay if past_key_values is None else 0),
            decision_logits=outputs.decision_logits,
        )


# ------------------------------------------------------------------------------- the families
@dataclass(frozen=True)
class Family:
    """A supported architecture: its stock classes and their DMC counterparts."""

    model_type: str
    config_class: type
    causal_lm_class: type
    dmc_config_class: type
    dmc_model_class: type
    dmc_causal_lm_class: type


def _dmc_family(model_type: str, config_class: type, model_class: type, causal_lm_class: type) -> Family:
    """The DMC config, base model and causal LM of one family, subclassing its stock classes and named as
    if written out (``DMCLlamaConfig``, ``DMCLlamaModel``, ``DMCLlamaForCausalLM``): the names are what
    saved configs record under ``architectures`` and what ``from dmc.hf.modeling import ...`` finds."""
    prefix = "DMC" + model_class.__name__.removesuffix("Model")

    def make(name: str, bases: tuple, namespace: dict) -> type:
        cls = type(name, bases, {"__module__": __name__, "__qualname__": name, **namespace})
        globals()[name] = cls
        return cls

    config = make(f"{prefix}Config", (config_class,), {"model_type": f"dmc_{model_type}", "dmc": None,
                                                        "__annotations__": {"dmc": "dict | None"}})
    config = globals()[config.__name__] = strict(accept_kwargs=True)(config)
    model = make(f"{prefix}Model", (DMCModelMixin, model_class), {"config_class": config})
    causal = make(f"{prefix}ForCausalLM", (DMCForCausalLMMixin, causal_lm_class),
                  {"config_class": config, "_family_causal_lm_class": causal_lm_class, "_dmc_base_model_class": model})
    return Family(model_type, config_class, causal_lm_class, config, model, causal)


FAMILIES = (
    _dmc_family("llama", LlamaConfig, LlamaModel, LlamaForCausalLM),
    _dmc_family("mistral", MistralConfig, MistralModel, MistralForCausalLM),
    _dmc_family("qwen2", Qwen2Config, Qwen2Model, Qwen2ForCausalLM),
    _dmc_family("qwen3", Qwen3Config, Qwen3Model, Qwen3ForCausalLM),
)


def _register() -> None:
    for family in FAMILIES:
        AutoConfig.register(family.dmc_config_class.model_type, family.dmc_config_class, exist_ok=True)
        AutoModel.register(family.dmc_config_class, family.dmc_model_class, exist_ok=True)
        AutoModelForCausalLM.register(family.dmc_config_class, family.dmc_causal_lm_class, exist_ok=True)


_register()
