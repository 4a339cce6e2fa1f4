"""Tiny models and tokenizers built on the spot, for tests, the demo and smoke runs (no hub)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

import torch


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (BOS/EOS included), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               max_positions: int = 1024, seed: int = 0):
    """A randomly initialised Llama-shaped causal LM."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def write_tiny_model_dir(path: str | pathlib.Path, texts: list[str], vocab_size: int = 512, **model_kwargs):
    """Save a tokenizer trained on ``texts`` and a random tiny Llama beside it; returns the path."""
    path = pathlib.Path(path)
    tokenizer = train_tokenizer(texts, vocab_size)
    model = tiny_llama(len(tokenizer), **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pretrain(model_dir: str | pathlib.Path, data: list[str], steps: int, seq_len: int = 128, batch_size: int = 8,
             lr: float = 3e-3, seed: int = 0, progress: bool = False, token_cache: str | None = None) -> list[float]:
    """Plain next-token pretraining of the model in ``model_dir`` on ``data`` (AdamW, cosine);
    saves it back in place. Returns the loss of every step."""
    import math

    import transformers
    from tqdm.auto import tqdm

    from .train.data import PackedData

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    rows = PackedData.from_sources(data, tokenizer, seq_len, val_fraction=0.0, seed=seed, cache_dir=token_cache,
                                   progress=progress)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in tqdm(range(steps), desc="pretraining", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        batch = rows.train_rows(list(range(step * batch_size, (step + 1) * batch_size)))
        # stock attention has no document mask: the labels still skip each document's first token
        loss = model(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(model_dir)
    return losses
