"""The engine's FP8 KV cache (``kv_cache_dtype="fp8"``): e4m3 pools with a scale per (layer, KV
head), 1.0 or given (calibration: tests/test_kv_scales.py), only the stored slots quantised. Checked on tiny random DMC models whose decisions merge:

- layer 0's pages are exactly the quantised pages of the exact cache (its inputs do not depend on the cache),
  and its window state is the exact one: merges sum exact values, quantisation never builds up;
- the logits of every prefill chunk and decode step stay close to those over the model-dtype cache, in
  every mode (DMC, vanilla, delayed merging, H2O/TOVA eviction), chunked prefill included;
- the Triton decode kernels (Triton's interpreter on a CPU) give the same tokens as the twins;
- the pools really are e4m3, the memory plan counts one byte an element (twice the pages of bf16);
- no page leaks; a clear error for a dtype the engine does not offer.

``kv_cache_dtype="auto"`` is the engine of tests/test_engine.py, unchanged."""

import argparse
import json
import math
import pathlib
import sys

import pytest
import torch
from conftest import dmc_model
from test_engine import _assert_no_leak, _engine, _prompts
from test_engine_delay import triton_decode

import dmc
from dmc.baselines import EvictionPolicy
from dmc.cli._engine_args import add_engine_arguments
from dmc.engine import KVScales
from dmc.engine.cache import CacheLayout
from dmc.engine.llm import KV_CACHE_DTYPES
from dmc.kernels.reference import quantise
from dmc.tiny import train_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import kv_fp8_quality  # noqa: E402
import throughput  # noqa: E402

FP8 = torch.float8_e4m3fn
GREEDY = dmc.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
MODES = {  # name -> (model, engine options)
    "dmc": (lambda: dmc_model("qwen2", window=4), {}),
    "unbounded": (lambda: dmc_model("qwen3", window=None), {}),
    "vanilla": (lambda: dmc_model("llama", window=4), {"vanilla": True}),
    "delayed": (lambda: dmc_model("llama", window=4, merge_delay=3), {}),
    "tova": (lambda: dmc_model("qwen2", window=4), {"vanilla": True, "eviction": EvictionPolicy("tova", budget=12)}),
    "h2o": (lambda: dmc_model("qwen2", window=4), {"vanilla": True, "eviction": EvictionPolicy("h2o", budget=12)}),
}


def _forced_logits(llm, prompt, chunk: int, prefix: int):
    """Teacher-forced logits of one sequence through the engine: ``prompt[:prefix]`` prefilled in chunks of
    ``chunk`` (the logits after each), then the rest one decode step at a time. Returns ``[N, V]`` and the row
    (still open)."""
    row, out = llm.cache.open_row(), []
    for start in range(0, prefix, chunk):
        out.append(llm.runner.prefill(row, prompt[start:min(start + chunk, prefix)], start))
    for t in range(prefix, len(prompt)):
        out.append(llm.runner.decode(torch.tensor([prompt[t]]), torch.tensor([t], dtype=torch.int32),
                                     torch.tensor([row], dtype=torch.int32))[0])
    return torch.stack(out), row


def _layer_pages(cache, layer: int, row: int):
    """A row's stored slots in ``layer``: lens ``[H]``, keys and values ``[N, D]`` (head by head) and the KV head
    of each ``[N]``."""
    lens = cache.lens[layer, row].long()
    slots = torch.arange(int(lens.max()))
    pages = cache.page_table[layer, row][:, slots // cache.layout.page_size].long()
    visible = slots < lens[:, None]
    heads = torch.arange(len(lens))[:, None].expand_as(visible)[visible]
    return lens, cache.k_pool[pages, slots % cache.layout.page_size][visible], \
        cache.v_pool[pages, slots % cache.layout.page_size][visible], heads


@pytest.mark.parametrize("mode, scaled", [("dmc", False), ("unbounded", False), ("delayed", False), ("dmc", True),
                                          ("delayed", True)])
def test_layer0_slots_are_the_exact_slots_quantised(mode, scaled):
    """Layer 0 sees the same inputs with either cache, so its decisions, slot counts and window state are the
    exact cache's and its pages hold exactly ``quantise(exact slot, its head's scale)``: only the stored slot
    is rounded, a merge rewrites it from the exact state (chunked prefill and decode steps, merges happening).
    ``scaled``: a different scale for every (layer, KV head), given as ``kv_scales``."""
    make, options = MODES[mode]
    model = make()
    prompt = _prompts((60,), seed=3)[0]
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    scales = KVScales(torch.rand(shape, generator=torch.Generator().manual_seed(0)) + 0.05,
                      torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.01) if scaled else None
    exact, fp8 = _engine(model, **options), _engine(model, kv_cache_dtype="fp8", kv_scales=scales, **options)
    _, row_a = _forced_logits(exact, prompt, 16, 40)
    _, row_b = _forced_logits(fp8, prompt, 16, 40)
    lens_a, k_a, v_a, heads = _layer_pages(exact.cache, 0, row_a)
    lens_b, k_b, v_b, _ = _layer_pages(fp8.cache, 0, row_b)
    assert torch.equal(lens_a, lens_b) and int(lens_a.sum()) < 0.8 * len(prompt) * lens_a.numel()  # merges
    assert k_b.dtype == FP8
    k_scale, v_scale = (None, None) if scales is None else (scales.k[0][heads, None], scales.v[0][heads, None])
    assert torch.equal(k_b.float(), quantise(k_a, FP8, k_scale).float())
    assert torch.equal(v_b.float(), quantise(v_a, FP8, v_scale).float())
    seen = len(prompt) - fp8.cache.raw_held(len(prompt))
    torch.testing.assert_close(fp8.cache.window_prefix(0, row_b, seen), exact.cache.window_prefix(0, row_a, seen),
                               rtol=0, atol=0)
    if mode == "delayed":
        torch.testing.assert_close(fp8.cache.delay_kv[0, row_b], exact.cache.delay_kv[0, row_a], rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_fp8_logits_stay_close_to_the_exact_cache(mode):
    """Teacher-forced over chunks of 8 (smaller than the prompt, so chunks attend to cached fp8 slots) and
    decode steps: the logits move by about a percent of their spread under DMC (merged slots average the
    rounding), a few percent uncompressed, and the greedy choice rarely changes. Eviction can drop another
    slot when rounding reorders close scores (a discrete change), hence its looser bound."""
    make, options = MODES[mode]
    model = make()
    prompt = _prompts((56,), seed=1)[0]
    exact, _ = _forced_logits(_engine(model, **options), prompt, 8, 32)
    fp8, _ = _forced_logits(_engine(model, kv_cache_dtype="fp8", **options), prompt, 8, 32)
    assert torch.isfinite(fp8).all()
    error = (fp8 - exact).norm() / (exact - exact.mean(-1, keepdim=True)).norm()
    agree = (fp8.argmax(-1) == exact.argmax(-1)).float().mean()
    bound = {"vanilla": 0.1, "h2o": 0.1, "tova": 0.35}.get(mode, 0.03)
    assert 0 < error < bound, error  # quantised (not the exact cache), and close
    assert agree >= (0.75 if "eviction" in options else 0.85), agree


@pytest.mark.parametrize("mode", list(MODES))
def test_fp8_generate_finishes_every_request_without_leaks(mode):
    """Batched generate with chunked prefill (prefill_chunk 16 < the longest prompts): every request runs to
    its length over e4m3 pools, and every page and row comes back."""
    make, options = MODES[mode]
    llm = _engine(make(), kv_cache_dtype="fp8", prefill_chunk=16, **options)
    assert llm.cache.k_pool.dtype == FP8 and llm.cache.v_pool.dtype == FP8
    prompts = _prompts((11, 4, 17, 40))
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
        assert out.compression["tokens"] == len(prompt) + GREEDY.max_tokens - 1
    if mode in ("dmc", "unbounded", "delayed"):
        assert max(o.compression["merge_rate"] for o in outs) > 0.2
    _assert_no_leak(llm)


@pytest.mark.parametrize("mode", ["dmc", "delayed"])
def test_fp8_triton_decode_equals_twins(mode):
    """The Triton decode kernels with fp8 pools (plain and delayed merging) against the twins' engine: the same
    greedy tokens and slot counts."""
    make, options = MODES[mode]
    model = make()
    engine = dict(prefill_chunk=7, max_model_len=32, kv_cache_dtype="fp8", **options)
    prompts = _prompts((11, 2, 17), seed=5)
    params = dmc.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)  # the interpreter is slow
    twin = _engine(model, **engine)
    with triton_decode(True):
        fast = _engine(model, **engine)
        kernels = fast.runner.kernels
        assert "triton" in (kernels.delayed_decode_update if mode == "delayed" else kernels.decode_update).__module__
        outs = fast.generate(prompts, params)
    twins = twin.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in twins]
    assert [o.compression["slots"] for o in outs] == [o.compression["slots"] for o in twins]
    _assert_no_leak(fast)


def test_pools_are_e4m3_and_hold_twice_the_pages_of_bf16():
    """The pools are float8_e4m3fn with fp32 [L, H] scales of 1.0; the window and delay rings keep the model
    dtype; the memory plan counts a byte an element: the same KV memory gives twice bf16's pages."""
    model = dmc_model("qwen2", window=4, merge_delay=3)
    llm = _engine(model, kv_cache_dtype="fp8")
    cache = llm.cache
    assert cache.k_pool.dtype == FP8 and cache.v_pool.dtype == FP8
    assert cache.ring_kv.dtype == torch.float32 and cache.delay_kv.dtype == torch.float32
    ones = torch.ones(model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert torch.equal(cache.k_scale, ones) and torch.equal(cache.v_scale, ones)
    assert _engine(model).cache.k_pool.dtype == torch.float32  # auto: the model dtype

    plan = dict(dtype=torch.bfloat16, device="cpu", max_model_len=4096, max_num_seqs=8, window=12, vanilla=False,
                utilization=0.9, kv_bytes=2**30, prefill_chunk=512)
    bf16 = CacheLayout.plan(model.config, **plan)
    fp8 = CacheLayout.plan(model.config, **plan, kv_dtype=FP8)
    assert fp8.page_bytes(FP8) * 2 == bf16.page_bytes(torch.bfloat16)
    assert 1.99 < fp8.num_pages / bf16.num_pages <= 2.0
    memory = 400 * fp8.page_bytes(torch.float32)  # an fp32 model's engine: fp8 pages are a quarter of its pages
    pages = [_engine(model, kv_cache_memory=memory, **kw).cache.layout.num_pages
             for kw in ({}, {"kv_cache_dtype": "fp8"})]
    assert 3.9 < pages[1] / pages[0] < 4.1


def test_a_kv_cache_dtype_the_engine_does_not_offer_is_refused():
    model = dmc_model("qwen2", window=4)
    for bad in ("int8", "fp8_e5m2", "bfloat16", torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=r"kv_cache_dtype must be 'auto' \(the model dtype\) or one of fp8"):
            _engine(model, kv_cache_dtype=bad)
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert parser.parse_args(["model"]).kv_cache_dtype == "auto"
    assert parser.parse_args(["model", "--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["model", "--kv-cache-dtype", "int8"])
    # The CLI spells the engine's names out (it does not import torch): they stay the same set.
    choices = next(a.choices for a in parser._actions if a.dest == "kv_cache_dtype")
    assert choices == ["auto", *KV_CACHE_DTYPES]


def test_quality_benchmark_scores_auto_and_fp8_through_the_engine(tmp_path):
    """benchmarks/kv_fp8_quality.py end to end on a tiny saved DMC model, 2 short windows prefilled in chunks of
    8: a row per kv_cache_dtype with a finite perplexity, fp8 close to auto, the realized CR of a merging model;
    the markdown table with the relative cost."""
    texts = ["def f(x):\n    return x * 2 + 1\n" * 40, "class A:\n    value = 3\n    name = 'a'\n" * 40]
    model_dir, data = tmp_path / "dmc", tmp_path / "heldout"
    dmc_model("qwen3", window=4, vocab_size=300).save_pretrained(model_dir)
    train_tokenizer(texts, vocab_size=300).save_pretrained(model_dir)
    data.mkdir()
    for i, text in enumerate(texts):
        (data / f"{i}.py").write_text(text)
    out = tmp_path / "out"
    assert kv_fp8_quality.main([str(model_dir), "--heldout", str(data), "--out", str(out), "--windows", "2",
                                "--window-len", "48", "--chunk", "8", "--calibration-windows", "1",
                                "--device", "cpu"]) == 0
    result = json.loads((out / "kv_fp8_quality.json").read_text())
    rows = {r["kv_cache_dtype"]: r for r in result["rows"]}
    assert set(rows) == {"auto", "fp8", "fp8-calibrated"} and result["meta"]["gpu"] == "cpu"
    for row in rows.values():
        assert row["model"] == str(model_dir) and row["windows"] == 2 and row["tokens"] == 2 * 47
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert row["realized_cr"] > 1.2  # merges happened
    for fp8 in ("fp8", "fp8-calibrated"):
        assert rows[fp8]["perplexity"] != rows["auto"]["perplexity"]
        assert abs(rows[fp8]["perplexity"] / rows["auto"]["perplexity"] - 1) < 0.05
        assert rows[fp8]["realized_cr"] == pytest.approx(rows["auto"]["realized_cr"], rel=0.1)
    table = (out / "kv_fp8_quality.md").read_text()
    assert "relative cost (fp8/auto − 1)" in table and "relative cost (calibrated)" in table and "| dmc |" in table


def test_throughput_rows_of_fp8_pages_have_their_own_config_and_column():
    """benchmarks/throughput.py (GPU only to run): fp8 engine rows are named cr<r>-fp8 (``--resume`` keeps the
    bf16 ones), carry kv_cache_dtype, and the table shows it, each compared with CR 1 of its own dtype (fp8 rows also with bf16's CR 1)."""
    result = dict(batch=8, tokens_per_s=100.0, step_ms=10.0, realized_cr=4.0, peak_memory_gib=1.0, kv_pool_gib=0.5,
                  prefill_tokens_per_s=1000.0)
    rows = [throughput.engine_row(1024, cr, kv, 8, {**result, "tokens_per_s": 100.0 * cr * (2 if kv == "fp8" else 1)})
            for kv in ("auto", "fp8") for cr in (1, 4)]
    assert [r["config"] for r in rows] == ["cr1", "cr4", "cr1-fp8", "cr4-fp8"]
    assert [r["kv_cache_dtype"] for r in rows] == ["auto", "auto", "fp8", "fp8"]
    legacy = {k: v for k, v in rows[0].items() if k != "kv_cache_dtype"}  # a row from before the flag
    table = throughput.report([legacy, *rows[1:]], "cpu")
    assert "| CR | KV dtype |" in table
    # fp8 rows: against CR 1 of their own dtype, and against the bf16 engine's CR 1 (what the FP8 target is stated against)
    assert "| 1024 | 4 | fp8 | 8 | 800 | 4.00x (8.00x bf16 CR 1) |" in table
    assert "| 1024 | 4 | auto | 8 | 400 | 4.00x |" in table
    only_bf16_base = throughput.report([legacy, rows[3]], "cpu")  # no fp8 CR 1 row: the bf16 one still counts
    assert "| 1024 | 4 | fp8 | 8 | 800 | - (8.00x bf16 CR 1) |" in only_bf16_base
