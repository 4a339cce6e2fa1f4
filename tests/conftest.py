"""Tiny random models of every supported family, with decisions driven so that merges happen."""

from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import dmc

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)

# name -> (stock class, config); Llama is MHA, the others GQA (G = 2)
BUILDERS = {
    "llama": (LlamaForCausalLM, lambda **kw: LlamaConfig(**{**COMMON, **kw}, num_attention_heads=4,
                                                         num_key_value_heads=4)),
    "mistral": (MistralForCausalLM, lambda **kw: MistralConfig(**{**COMMON, **kw}, num_attention_heads=4,
                                                               num_key_value_heads=2, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, lambda **kw: Qwen2Config(**{**COMMON, **kw}, num_attention_heads=4,
                                                         num_key_value_heads=2)),
    "qwen3": (Qwen3ForCausalLM, lambda **kw: Qwen3Config(**{**COMMON, **kw}, num_attention_heads=4,
                                                         num_key_value_heads=2, head_dim=16)),
}
FAMILIES = ["llama", "qwen2", "qwen3"]  # the three the spec's checks must cover


def stock_model(name: str, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random model of a family; ``config`` overrides fields (e.g. vocab_size)."""
    torch.manual_seed(seed)
    cls, make_config = BUILDERS[name]
    model = cls(make_config(**config)).float().eval()
    if name == "qwen3":  # non-trivial norm weights, so reading α after q/k norms matters
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def drive_merges(model: torch.nn.Module, scale: float = 4.0, shift: float = 1.5, seed: int = 1) -> None:
    """Rewrite the decision rows of k_proj (and the importance rows of q_proj) so that a good share
    of tokens merge: k[D-1] spreads by ~``scale``; families with a k bias get +``shift`` on it and
    Qwen3 a larger k_norm weight on channel D-1 (its norm bounds k[D-1])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            d = attn.head_dim
            for proj, spread in ((attn.k_proj, scale), (attn.q_proj, 2.0)):
                rows = proj.weight.view(-1, d, proj.weight.shape[-1])
                rows[:, -1, :] = torch.randn(rows[:, -1, :].shape, generator=g) * spread / rows.shape[-1] ** 0.5
            if attn.k_proj.bias is not None:
                attn.k_proj.bias.view(-1, d)[:, -1] = shift
            if attn.k_norm is not None:
                rows = attn.k_proj.weight.view(-1, d, attn.k_proj.weight.shape[-1])
                rows[:, -1, :] *= 4.0
                attn.k_norm.weight[-1] = 2.5


def dmc_model(name: str, window: int | None = 4, init_offset: float = 1.0, seed: int = 0,
              vocab_size: int = VOCAB, **kw):
    """A converted DMC model whose decisions merge a good share of tokens (30-60%). The offset c
    is lowered from 5 so that random weights reach it; the semantics do not depend on c."""
    model = dmc.convert(stock_model(name, seed, vocab_size=vocab_size),
                        dmc.DMCConfig(window=window, init_offset=init_offset, **kw))
    drive_merges(model, shift=init_offset + 0.5)
    return model.eval()


def group_lengths(decisions: torch.Tensor) -> torch.Tensor:
    """Lengths of all merge groups in hard decisions [..., L] (a group = an append + its merges)."""
    flat = decisions.reshape(-1, decisions.shape[-1]).tolist()
    out = []
    for row in flat:
        run = 0
        for a in row:
            if a < 0.5:
                if run:
                    out.append(run)
                run = 1
            else:
                run += 1
        out.append(run)
    return torch.tensor(out)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


# lm-evaluation-harness tasks over a local JSONL file (no download): the YAML body of each kind.
LM_EVAL_TASKS = {
    "mc": "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
          "metric_list:\n  - metric: acc\n",
    "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n"
           "  - metric: word_perplexity\n",
    "gen": "output_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{choices[label]}}\"\n"
           "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n"
           "  - metric: exact_match\n",
}


def write_lm_eval_tasks(root, docs: list[dict], prefix: str, kinds=("mc", "ppl", "gen")):
    """``docs`` as ``root/data.jsonl`` and a task ``{prefix}_{kind}`` of each kind in ``root/tasks`` (returned):
    multiple choice (log-likelihood requests), rolling perplexity, greedy generation."""
    import json

    (root / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'data.jsonl'}\n"
              f"  cache_dir: {root / 'hf_datasets'}\ntest_split: test\n")
    for kind in kinds:
        (tasks / f"{kind}.yaml").write_text(f"task: {prefix}_{kind}\n" + source + LM_EVAL_TASKS[kind])
    return tasks
