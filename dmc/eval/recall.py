"""Long-context recall: key-value pairs in the prompt, retrieve one value at the end.

Merging averages a slot's tokens and eviction drops them; the probe shows what each keeps. Keys
and values are random lowercase strings; the answer is read greedily through the model's cache
(``generate``), and a trial counts when the generated text starts with the value.
"""

from __future__ import annotations

import random
import string

import torch


def check_probe(pairs: int, trials: int) -> None:
    """ValueError for a probe that cannot give an accuracy."""
    if not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be an integer >= 1, got {pairs!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")


def make_trial(rng: random.Random, pairs: int, key_len: int = 4, value_len: int = 4) -> tuple[str, str]:
    letters = string.ascii_lowercase
    keys = set()
    while len(keys) < pairs:
        keys.add("".join(rng.choice(letters) for _ in range(key_len)))
    keys = sorted(keys)
    values = ["".join(rng.choice(letters) for _ in range(value_len)) for _ in keys]
    lines = "\n".join(f"{k} = {v}" for k, v in zip(keys, values))
    target = rng.randrange(pairs)
    return f"{lines}\n{keys[target]} =", f" {values[target]}"


@torch.no_grad()
def recall_probe(model, tokenizer, pairs: int = 20, trials: int = 20, seed: int = 0) -> dict:
    """Accuracy of retrieving one of ``pairs`` key-value pairs, over ``trials`` prompts."""
    check_probe(pairs, trials)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    correct, prompt_tokens = 0, 0
    for _ in range(trials):
        prompt, answer = make_trial(rng, pairs)
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        want = tokenizer(answer, add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(want), do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
        got = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += got.strip() == answer.strip()
        prompt_tokens += ids.shape[1]
    return {"accuracy": correct / trials, "trials": trials, "pairs": pairs,
            "mean_prompt_tokens": prompt_tokens / trials}
