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
    """Plain next-token pretraining of the model in ``model_dir`` on ``data``, saved back in place.

    One run of the project's trainer (:class:`dmc.train.Retrofitter`, ``method="plain"``, a single
    fine-tune stage: AdamW, a cosine from ``lr`` to ``lr / 10``, no validation split). Returns the
    LM loss of every step."""
    import contextlib
    import io
    import json
    import os
    import shutil

    from .train import Retrofitter, TrainConfig

    model_dir = pathlib.Path(model_dir)
    work = model_dir.with_name(f".{model_dir.name}.pretrain")  # the trainer writes a new directory: moved back
    cfg = TrainConfig(model=str(model_dir), data=list(data), out=str(work), method="plain", stages=["finetune"],
                      finetune_steps=steps, seq_len=seq_len, micro_batch_size=batch_size, lr=lr, min_lr=lr / 10,
                      seed=seed, val_fraction=0.0, token_cache=token_cache, eval_every=steps + 1,
                      save_every=steps + 1, keep_checkpoints=1, tensorboard=False, progress=progress, overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its note that there is no validation split
        trainer = Retrofitter(cfg)
    trainer.run()
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line]
    for f in sorted((f for f in work.iterdir() if f.is_file()), key=lambda f: f.name == "config.json"):
        os.replace(f, model_dir / f.name)  # config.json last: never a half-replaced model
    shutil.rmtree(work)
    return [r["lm_loss"] for r in records]
