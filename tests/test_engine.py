"""The engine (dmc.LLM) against the HF path: same tokens, same slots, no page leaks, clear errors."""

import pytest
import torch
from conftest import VOCAB, dmc_model, stock_model

import dmc
from dmc.engine.cache import CacheLayout

GREEDY = dmc.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _prompts(lengths=(11, 4, 17, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _engine(model, **kw):
    kw = {"device": "cpu", "max_model_len": 128, "max_num_seqs": 8, "progress": False, **kw}
    return dmc.LLM(model, **kw)


def _assert_no_leak(llm):
    assert llm.cache.free_page_count() == llm.initial_free_pages
    assert llm.cache.free_row_count() == llm.cache.layout.max_seqs
    assert not llm.scheduler.running and not llm.scheduler.waiting


@pytest.mark.parametrize("family,window", [("llama", 4), ("qwen2", 12), ("qwen3", None), ("mistral", 4)])
def test_greedy_equals_hf_generate(family, window):
    model = dmc_model(family, window=window)
    prompts = _prompts()
    llm = _engine(model)
    outs = llm.generate(prompts, GREEDY)
    merged = 0.0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(model, prompt, 12)
        assert out.finish_reason == "length" and out.compression["tokens"] == len(prompt) + 11
        merged = max(merged, out.compression["merge_rate"])
    assert merged > 0.2  # merges really happened
    _assert_no_leak(llm)


def test_vanilla_plain_model_equals_transformers(tmp_path):
    stock = stock_model("qwen2")
    stock.save_pretrained(tmp_path)
    llm = dmc.LLM(tmp_path, device="cpu", max_model_len=128, max_num_seqs=4, progress=False)
    assert llm.vanilla
    prompts = _prompts()
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.token_ids == _hf_greedy(stock, prompt, 12)
        assert out.compression["cr"] == 1.0
    _assert_no_leak(llm)


def _row_state(llm, row):
    """Slots (gathered from pages), lengths and the chronological window state of a row."""
    cache, p = llm.cache, llm.cache.layout.page_size
    lens = cache.lens[:, row].long()
    s = int(lens.max())
    slots = torch.arange(s, device=lens.device)
    pages = cache.page_table[:, row][..., slots // p].long()
    mask = (slots < lens[..., None])[..., None]
    keys = cache.k_pool[pages, slots % p] * mask
    values = cache.v_pool[pages, slots % p] * mask
    return lens, keys, values


@pytest.mark.parametrize("window", [4, 12, None])
def test_parallel_prefill_equals_token_by_token(window):
    model = dmc_model("qwen2", window=window)
    prompt = _prompts((45,))[0]
    parallel = _engine(model)
    stepwise = _engine(model)
    a = parallel.cache.open_row()
    parallel.runner.prefill(a, prompt, 0)
    b = stepwise.cache.open_row()
    stepwise.runner.prefill(b, prompt[:1], 0)
    for t in range(1, len(prompt)):  # the engine's decode step, one token at a time
        stepwise.runner.decode(torch.tensor([prompt[t]]), torch.tensor([t], dtype=torch.int32),
                               torch.tensor([b], dtype=torch.int32))
    (la, ka, va), (lb, kb, vb) = _row_state(parallel, a), _row_state(stepwise, b)
    assert torch.equal(la, lb) and int(la.max()) > 16  # crosses a page boundary
    assert 0.25 < 1 - la.sum() / (len(prompt) * la.numel()) < 0.75
    torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)
    seen = len(prompt)
    for layer in range(parallel.cache.layout.num_layers):
        torch.testing.assert_close(parallel.cache.window_prefix(layer, a, seen),
                                   stepwise.cache.window_prefix(layer, b, seen), atol=1e-5, rtol=1e-5)


def test_chunked_prefill_and_small_batches_give_the_same_tokens():
    model = dmc_model("llama", window=4)
    prompts = _prompts((70, 33, 5))
    one_go = _engine(model).generate(prompts, GREEDY)
    chunked = _engine(model, prefill_chunk=16, max_num_seqs=2).generate(prompts, GREEDY)
    assert [o.token_ids for o in one_go] == [o.token_ids for o in chunked]


def test_forced_period_compresses_at_exactly_that_ratio():
    llm = _engine(dmc_model("llama", window=12), forced_period=4)
    out = llm.generate(_prompts((64,)), dmc.SamplingParams(max_tokens=16, temperature=0))[0]
    tokens = out.compression["tokens"]
    assert tokens == 79 and out.compression["slots"] == 20 * llm.cache.layout.rows  # ceil(79 / 4) per head


def test_preemption_by_recompute_keeps_outputs_and_frees_everything():
    model = dmc_model("qwen2", window=4)
    layout_bytes = CacheLayout(2, 2, 16, 0, 4, 128, 4, False).sequence_bytes(torch.float32) * 5
    page = 2 * 16 * 16 * 4
    # room for ~2 sequences at CR 1 while admission believes 10x: preemption must happen
    llm = _engine(model, max_num_seqs=4, kv_cache_memory=layout_bytes + 40 * page, admission_margin=-0.9)
    prompts = _prompts((30, 25, 28, 20))
    params = dmc.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert sum(o.num_preemptions for o in outs) > 0
    for prompt, out in zip(prompts, outs):
        assert out.error is None and out.token_ids == _hf_greedy(model, prompt, 40)
    _assert_no_leak(llm)


def test_bad_requests_fail_alone():
    llm = _engine(dmc_model("llama"))
    good = _prompts((9,))[0]
    outs = llm.generate([good, [], [3] * 128, good, [VOCAB + 5]],
                        [GREEDY, GREEDY, GREEDY, dmc.SamplingParams(top_p=0.0), GREEDY])
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 12
    assert outs[1].finish_reason == "error" and "empty prompt" in outs[1].error
    assert "max_model_len" in outs[2].error
    assert "top_p" in outs[3].error
    assert "token ids" in outs[4].error
    assert [o.request_id for o in outs] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="2 prompts but 1"):
        llm.generate([good, good], [GREEDY])
    _assert_no_leak(llm)


def test_too_little_memory_says_how_much_is_needed():
    with pytest.raises(MemoryError, match="needs .* GiB"):
        _engine(dmc_model("llama"), kv_cache_memory=100_000)


def test_sampling_is_seeded_per_request_and_top_k_1_is_greedy():
    model = dmc_model("llama")
    prompts = _prompts((12, 7, 20))
    seeded = dmc.SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=123)
    alone = _engine(model).generate([prompts[0]], seeded)[0].token_ids
    in_batch = _engine(model).generate(prompts, [seeded, GREEDY, dmc.SamplingParams(max_tokens=5, seed=7)])
    assert in_batch[0].token_ids == alone
    other_seed = _engine(model).generate([prompts[0]], dmc.SamplingParams(max_tokens=10, temperature=0.8,
                                                                          top_p=0.9, seed=124))[0].token_ids
    assert other_seed != alone
    top1 = _engine(model).generate(prompts, dmc.SamplingParams(max_tokens=12, temperature=0.7, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in _engine(model).generate(prompts, GREEDY)]


def test_stop_tokens_and_streaming():
    model = dmc_model("llama")
    prompt = _prompts((10,))[0]
    full = _engine(model).generate([prompt], GREEDY)[0].token_ids
    stop = full[5]
    first = full.index(stop)
    out = _engine(model).generate([prompt], dmc.SamplingParams(max_tokens=12, temperature=0,
                                                                stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:first + 1]
    llm = _engine(model)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    finished = set()
    for update in llm.stream([prompt, prompt[:4]], GREEDY):
        streamed[update.request_id] += update.new_token_ids
        if update.finished:
            finished.add(update.request_id)
    assert finished == {0, 1} and streamed[0] == full
    _assert_no_leak(llm)


def test_text_prompts_with_a_tokenizer(tmp_path):
    from dmc.tiny import write_tiny_model_dir
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20
    write_tiny_model_dir(tmp_path, texts, vocab_size=300)
    llm = dmc.LLM(tmp_path, device="cpu", max_model_len=64, max_num_seqs=2, progress=False)
    out = llm.generate(["def f(x):", "import"], dmc.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 5 and isinstance(o.text, str) for o in out)
    assert out[0].text == llm.tokenizer.decode(out[0].token_ids, skip_special_tokens=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels and CUDA graphs need CUDA")
@pytest.mark.parametrize("family,window", [("llama", 12), ("qwen3", None), ("mistral", 4)])
def test_gpu_engine_equals_hf_generate(family, window):
    """On CUDA the engine runs the Triton kernels inside CUDA graphs: same tokens as HF generate."""
    model = dmc_model(family, window=window).cuda()
    prompts = _prompts((11, 4, 17, 40, 70))
    llm = dmc.LLM(model, device="cuda", dtype=torch.float32, max_model_len=128, max_num_seqs=8, progress=False,
                  kv_cache_memory=64 * 2**20)
    outs = llm.generate(prompts, GREEDY)
    assert llm.runner.graphs  # the decode step ran from CUDA graphs
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    _assert_no_leak(llm)


@pytest.mark.parametrize("n", [5, 128, 200])
def test_bucketed_flex_attention_equals_dense(n):
    """Prefill's FlexAttention pads to a power-of-two bucket (one compilation per bucket): exact."""
    from dmc.hf.attention import dense_attend, flex_attend_bucketed
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, 16, generator=g) for heads in (4, 2, 2))
    key_bias = torch.where(torch.rand(1, 2, n, generator=g) < 0.5, float("-inf"), 0.0)
    key_bias[..., -1] = 0
    torch.testing.assert_close(flex_attend_bucketed(q, k, v, key_bias, 0.25),
                               dense_attend(q, k, v, key_bias, None, 0.25), atol=1e-5, rtol=1e-5)


def test_smallest_allowed_pool_admits_the_longest_prompt():
    """Sizing and admission agree: a pool of the minimum size the engine accepts must run a prompt
    of max_model_len - 1 tokens (it would otherwise wait forever for pages that never free up)."""
    model = dmc_model("llama")
    config = model.config
    shape = CacheLayout(config.num_hidden_layers, config.num_key_value_heads,
                        config.hidden_size // config.num_attention_heads, 0, 1, 128, 4, False)
    tables = shape.sequence_bytes(torch.float32) * 2
    fits = None
    for extra_pages in range(0, 2 * shape.rows + 2):  # the smallest pool the engine accepts
        try:
            page = shape.page_bytes(torch.float32)
            llm = _engine(model, max_num_seqs=1,
                          kv_cache_memory=tables + (shape.rows * shape.pages_per_head + extra_pages) * page)
        except MemoryError:
            continue
        fits = llm
        break
    assert fits is not None
    request = fits.add_request(_prompts((127,))[0], dmc.SamplingParams(max_tokens=1, temperature=0))
    for _ in range(5):
        fits.step()
    assert not fits.has_unfinished()
    assert request.error is None and request.finish_reason == "length" and len(request.output_ids) == 1
    _assert_no_leak(fits)


def test_warmup_runs_every_prompt_bucket_and_leaves_the_engine_as_it_was():
    """LLM.warmup (dmc serve's startup): one throwaway prompt per power-of-two bucket up to the prefill chunk (the
    last cut to max_model_len - 2), then the engine is as new: every page and row free, the admission's CR
    estimate and the request ids untouched, and it generates as an engine that never warmed up."""
    model = dmc_model("llama", window=4)
    llm = _engine(model, max_model_len=300, prefill_chunk=256)
    fresh = _engine(model, max_model_len=300, prefill_chunk=256)
    estimate = vars(llm.scheduler.estimate).copy()
    forwards, prefill = [], llm.runner.prefill_batch
    llm.runner.prefill_batch = lambda rows, chunks, seen, **kw: (forwards.append([len(c) for c in chunks]),
                                                                 prefill(rows, chunks, seen, **kw))[1]
    done = llm.warmup()
    assert forwards == [[128], [256], [128, 128]]
    assert done["prompt_lengths"] == [128, 256] and done["graph_buckets"] == []  # no CUDA graphs on a CPU
    assert done["packed_lengths"] == [256]  # two new prompts of 128 in one forward: the packed form's bucket
    _assert_no_leak(llm)
    assert vars(llm.scheduler.estimate) == estimate and llm._next_id == 0
    params = dmc.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out, want = llm.generate(_prompts(), params), fresh.generate(_prompts(), params)
    assert [o.token_ids for o in out] == [o.token_ids for o in want] and out[0].request_id == 0
    assert _engine(model, max_model_len=100).warmup()["prompt_lengths"] == [98]
    llm.add_request([5, 6, 7])
    with pytest.raises(ValueError, match="before any request"):
        llm.warmup()
