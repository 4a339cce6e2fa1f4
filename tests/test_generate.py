"""generate() with the DMC cache: greedy, sampling, left-padded batches."""

import pytest
import torch
from conftest import VOCAB, dmc_model

PAD = 0


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in (11, 4, 17)]


def _left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_left_padded_batch_equals_unpadded_generation(family):
    model = dmc_model(family, window=4)
    prompts = _prompts()
    ids, mask = _left_pad(prompts)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)
        for i, prompt in enumerate(prompts):
            single = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    return_dict_in_generate=True, **kw)
            assert torch.equal(batch.sequences[i, ids.shape[1]:], single.sequences[0, len(prompt):])
            # padding never enters a head's slots: the padded row keeps exactly the unpadded slots
            assert torch.equal(batch.past_key_values.slot_counts()[:, i], single.past_key_values.slot_counts()[:, 0])
    assert batch.past_key_values.positions.tolist() == [len(p) + 11 for p in prompts]  # last token not fed back


def test_greedy_generate_follows_full_sequence_argmax():
    model = dmc_model("qwen2", window=4)
    prompt = _prompts()[0][None]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        logits = model(out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, prompt.shape[1] - 1:].argmax(-1), out[0, prompt.shape[1]:])
    merged = model(out, use_cache=False).decisions
    assert 0.2 < float(merged.mean()) < 0.8


def test_sampling_generate():
    model = dmc_model("llama", window=4)
    ids, mask = _left_pad(_prompts(1))
    kw = dict(max_new_tokens=8, pad_token_id=PAD, eos_token_id=None, attention_mask=mask)
    with torch.no_grad():
        greedy = model.generate(ids, do_sample=False, **kw)
        top1 = model.generate(ids, do_sample=True, top_k=1, temperature=0.7, **kw)
        torch.manual_seed(0)
        a = model.generate(ids, do_sample=True, temperature=1.5, top_p=0.95, **kw)
        torch.manual_seed(0)
        b = model.generate(ids, do_sample=True, temperature=1.5, top_p=0.95, **kw)
    assert torch.equal(greedy, top1)  # sampling from the single most likely token is greedy
    assert torch.equal(a, b)  # seeded sampling is reproducible
    assert not torch.equal(a, greedy)  # and at temperature 1.5 actually samples


def test_right_padding_in_full_sequence_mode_and_clear_error_with_cache():
    model = dmc_model("qwen2", window=4)
    prompts = _prompts()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        mask[i, :len(p)] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=False)
        for i, p in enumerate(prompts):
            alone = model(p[None], use_cache=False)
            torch.testing.assert_close(batch.logits[i, :len(p)], alone.logits[0], rtol=1e-4, atol=2e-5)
            assert torch.equal(batch.compression.slots[:, i], alone.compression.slots[:, 0])
        with pytest.raises(ValueError, match="use_cache=False"):
            model(ids, attention_mask=mask, use_cache=True)
