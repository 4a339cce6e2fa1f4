"""H2O, TOVA and SnapKV in the engine (dmc.LLM(eviction=...)) against the HF path's EvictionCache: same tokens,
same kept positions per head, the budget held after every step, pages returned, clear errors."""

import json

import pytest
import torch
from conftest import VOCAB, dmc_model, stock_model

import dmc
from dmc.baselines import EvictionCache, EvictionPolicy
from dmc.cli.main import main

MAX_TOKENS = 24


def _vanilla_model(family="qwen2"):
    model = dmc.convert(stock_model(family))
    model.set_dmc_mode(vanilla=True)
    return model.eval()


def _prompts(lengths=(40, 9, 23, 70), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _engine(model, policy, **kw):
    kw = {"device": "cpu", "max_model_len": 128, "max_num_seqs": 8, "progress": False, "vanilla": True, **kw}
    return dmc.LLM(model, eviction=policy, **kw)


def _greedy(n=MAX_TOKENS):
    return dmc.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _hf_generate(model, prompt, cache):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), past_key_values=cache, max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _assert_no_leak(llm):
    assert llm.cache.free_page_count() == llm.initial_free_pages
    assert llm.cache.free_row_count() == llm.cache.layout.max_seqs
    assert not llm.scheduler.running and not llm.scheduler.waiting


@pytest.mark.parametrize("method,budget,family", [("tova", 5, "qwen2"), ("h2o", 17, "llama"), ("tova", 33, "qwen3"),
                                                  ("h2o", 5, "qwen2"), ("snapkv", 17, "llama"), ("snapkv", 5, "qwen2")])
def test_greedy_equals_hf_generate_with_an_eviction_cache(method, budget, family):
    """A batch of prompts shorter and longer than the budget (17 and 33 cross a page boundary)."""
    model = _vanilla_model(family)
    policy = EvictionPolicy(method, budget=budget)
    prompts = _prompts()
    llm = _engine(model, policy)
    outs = llm.generate(prompts, _greedy())
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_generate(model, prompt, EvictionCache(model.config, policy))
        assert out.compression["slots"] == min(budget, out.compression["tokens"]) * llm.cache.layout.rows
    uncompressed = _engine(model, None).generate(prompts, _greedy())
    assert [o.token_ids for o in outs] != [o.token_ids for o in uncompressed]  # eviction changed the output
    _assert_no_leak(llm)


def _hf_positions(cache):
    """Kept token positions per (layer, head) of a batch-1 HF eviction cache."""
    return [[sorted(p[p >= 0].tolist()) for p in layer.positions[0]] for layer in cache.layers]


def _engine_positions(llm, row):
    ev, lens = llm.runner.policy, llm.cache.lens[:, row]
    return [[sorted(ev.positions[layer, row, head, :lens[layer, head]].tolist()) for head in range(lens.shape[1])]
            for layer in range(lens.shape[0])]


@pytest.mark.parametrize("method,budget,recent,chunk", [("tova", 17, None, 4096), ("h2o", 17, 6, 4096),
                                                        ("h2o", 5, 2, 16), ("snapkv", 17, 6, 4096),
                                                        ("snapkv", 9, 3, 16)])
def test_kept_positions_match_the_hf_cache_after_every_step(method, budget, recent, chunk):
    """Step by step: the engine's kept positions per head equal the HF cache's (fed the same prompt
    chunks and tokens), no head ever holds more than the budget, H2O keeps its recent window and
    SnapKV its observation window (``recent`` here)."""
    model = _vanilla_model()
    policy = EvictionPolicy(method, budget=budget, recent=recent if method == "h2o" else None,
                            window=recent if method == "snapkv" else None)
    prompts = _prompts((40, 12, 70))
    llm = _engine(model, policy, prefill_chunk=chunk)
    requests = [llm.add_request(p, _greedy()) for p in prompts]
    caches = [EvictionCache(model.config, policy) for _ in prompts]
    fed = [0] * len(prompts)
    compared = 0
    while llm.has_unfinished():
        llm.step()
        assert int(llm.cache.lens.max()) <= budget
        for i, request in enumerate(requests):
            if request.row is None or request.prefilling:  # a long prompt is prefilled over several steps
                continue
            tokens = request.prompt_ids + request.output_ids
            # the prompt in the engine's chunks, then token by token (admission also decodes one token)
            prompt = request.prompt_ids
            pieces = [prompt[s:s + chunk] for s in range(0, len(prompt), chunk)] if fed[i] == 0 else []
            pieces += [[t] for t in tokens[fed[i] + sum(map(len, pieces)):request.seen]]
            with torch.no_grad():
                for piece in pieces:
                    logits = model(torch.tensor([piece]), past_key_values=caches[i], use_cache=True).logits
            fed[i] = request.seen
            assert int(logits[0, -1].argmax()) == request.output_ids[-1]
            kept = _engine_positions(llm, request.row)
            assert kept == _hf_positions(caches[i])
            if method != "tova":
                newest = set(range(request.seen - policy.protected, request.seen))
                assert all(newest <= set(head) for layer in kept for head in layer)
            compared += 1
    assert compared > 2 * MAX_TOKENS
    assert all(len(r.output_ids) == MAX_TOKENS for r in requests)
    _assert_no_leak(llm)


def test_the_bounded_cache_admits_more_sequences_and_frees_the_prompt_pages():
    """A pool that holds one long sequence whole runs four at once with a 5-slot budget: each prompt's
    pages are held only while it is prefilled, then one page per head remains (no preemption)."""
    model = _vanilla_model()
    layout = _engine(model, None, max_num_seqs=4).cache.layout
    tables = layout.sequence_bytes(torch.float32) * 5
    state = layout.rows * 6 * 4 * 5  # TOVA: the positions of budget + 1 slots, for 4 + 1 rows
    pool = (layout.rows * 11 + 1) * layout.page_bytes(torch.float32)
    prompts = _prompts((100, 90, 80, 70))
    for policy, admitted in ((EvictionPolicy("tova", 5), 4), (None, 1)):
        llm = _engine(model, policy, max_num_seqs=4, kv_cache_memory=tables + state + pool)
        requests = [llm.add_request(p, _greedy()) for p in prompts]
        llm.step()
        assert len(llm.scheduler.running) == admitted
        if policy is not None:
            assert llm.initial_free_pages - llm.cache.free_page_count() == 4 * layout.rows  # a page per head
        while llm.has_unfinished():
            llm.step()
        assert all(r.finish_reason == "length" and r.preemptions == 0 for r in requests)
        _assert_no_leak(llm)


def test_invalid_settings_raise_clearly():
    with pytest.raises(ValueError, match="unknown eviction method"):
        EvictionPolicy("lru", 8)
    with pytest.raises(ValueError, match="recent window"):
        EvictionPolicy("h2o", 8, recent=9)
    compressing = dmc_model("llama")
    with pytest.raises(ValueError, match="vanilla=True"):
        _engine(compressing, EvictionPolicy("tova", 8), vanilla=False)
    with pytest.raises(ValueError, match="forced_period"):
        _engine(compressing, EvictionPolicy("tova", 8), vanilla=False, forced_period=4)
    with pytest.raises(ValueError, match="below max_model_len"):
        _engine(_vanilla_model(), EvictionPolicy("h2o", 128))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the GPU test below runs these kernels")
def test_triton_kernels_path_equals_hf(monkeypatch):
    """The decode step with the Triton kernels (interpreted on a CPU) evicts as the HF cache does."""
    pytest.importorskip("triton")
    from test_kernels import interpreter
    model = _vanilla_model("llama")
    policy = EvictionPolicy("h2o", budget=17, recent=4)
    prompt = _prompts((30,))[0]
    with interpreter():
        monkeypatch.setenv("DMC_FORCE_TRITON", "1")
        llm = _engine(model, policy)
        out = llm.generate([prompt], _greedy(6))[0]
    assert out.token_ids == _hf_generate(model, prompt, EvictionCache(model.config, policy))[:6]
    _assert_no_leak(llm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels and CUDA graphs need CUDA")
@pytest.mark.parametrize("method", ["tova", "h2o", "snapkv"])
def test_gpu_eviction_in_cuda_graphs_equals_hf(method):
    """On CUDA the eviction step (no host sync) runs inside the decode step's CUDA graphs."""
    model = _vanilla_model("qwen2").cuda()
    policy = EvictionPolicy(method, budget=17)
    prompts = _prompts()
    llm = dmc.LLM(model, device="cuda", dtype=torch.float32, vanilla=True, eviction=policy, max_model_len=128,
                  max_num_seqs=8, progress=False, kv_cache_memory=64 * 2**20)
    outs = llm.generate(prompts, _greedy())
    assert llm.runner.graphs
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt], device="cuda"), past_key_values=EvictionCache(model.config, policy),
                                 max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    _assert_no_leak(llm)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dmc.tiny import write_tiny_model_dir
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("tiny"), texts, vocab_size=300))


ENGINE = ["--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "4"]


def test_cli_generate_and_bench_with_eviction(model_dir, capsys):
    assert main(["generate", model_dir, "--prompt", "def f(x):\n    return x", "--max-tokens", "20", "--ignore-eos",
                 "--json", "--eviction", "h2o", "--eviction-budget", "6", "--eviction-recent", "2", *ENGINE]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["compression"]["slots"] == 6 * 2 * 2  # budget x layers x KV heads of the tiny model
    assert main(["bench", model_dir, "--prompt-len", "16", "--gen-len", "16", "--measure-steps", "8", "--json",
                 "--eviction", "tova", "--eviction-budget", "4", *ENGINE]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["realized_cr"] == pytest.approx(31 / 4)
    assert main(["generate", model_dir, "--prompt", "def f(x):\n    return x", "--max-tokens", "20", "--ignore-eos",
                 "--json", "--eviction", "snapkv", "--eviction-budget", "8", "--eviction-window", "3", *ENGINE]) == 0
    assert json.loads(capsys.readouterr().out.strip())["compression"]["slots"] == 8 * 2 * 2


@pytest.mark.parametrize("args,message", [
    (["--eviction-budget", "8"], "--eviction-budget needs --eviction"),
    (["--eviction", "tova"], "--eviction needs --eviction-budget"),
    (["--eviction", "tova", "--eviction-budget", "8", "--eviction-recent", "2"], "--eviction-recent is H2O's"),
    (["--eviction", "h2o", "--eviction-budget", "8", "--eviction-window", "2"], "--eviction-window is SnapKV's"),
    (["--eviction-window", "4"], "--eviction-window needs --eviction"),
    (["--eviction", "snapkv", "--eviction-budget", "8", "--eviction-window", "9"], "observation window"),
    (["--eviction", "h2o", "--eviction-budget", "0"], ">= 1 slot"),
])
def test_cli_eviction_errors(model_dir, capsys, args, message):
    assert main(["generate", model_dir, "--prompt", "x", *args, *ENGINE]) == 2
    assert message in capsys.readouterr().err
