"""The step's token budget (max_num_batched_tokens): decoding requests count first, prefill gets the rest, so a
wave of prompts is prefilled over several steps while the running requests keep decoding; outputs are the same
as without the budget (chunked prefill is exact); clear errors for a budget below max_num_seqs."""

import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, dmc_model

import dmc

GREEDY = dmc.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _engine(model, **kw):
    return dmc.LLM(model, device="cpu", max_model_len=128, max_num_seqs=8, progress=False, **kw)


def _record_prefill(llm):
    """Wrap the runner's batched prefill: the tokens of every prefill forward, and how many requests were
    decoding at the start of the step that ran it."""
    seen = []
    forward = llm.runner.prefill_batch

    def recording(rows, chunks, done):
        seen.append((sum(len(c) for c in chunks), decoding[0], len(chunks), [(len(c), d) for c, d in zip(chunks, done)]))
        return forward(rows, chunks, done)

    decoding = [0]
    step = llm.step

    def counting_step():
        decoding[0] = llm.scheduler.decoding_count()
        return step()

    llm.runner.prefill_batch = recording
    llm.step = counting_step
    return seen


@pytest.mark.parametrize("merge_delay", [0, 3])
def test_decoding_requests_count_against_the_step_budget(merge_delay):
    model = dmc_model("llama", window=4, merge_delay=merge_delay) if merge_delay else dmc_model("llama", window=4)
    prompts = _prompts([9, 7, 40, 33, 25, 5])
    free = _engine(model).generate(prompts, GREEDY)
    llm = _engine(model, prefill_chunk=24, max_num_batched_tokens=12)
    seen = _record_prefill(llm)
    requests = [llm.add_request(p, GREEDY) for p in prompts[:2]]  # two decode first, then a wave arrives
    while any(not r.prefilling and not r.output_ids for r in requests) or not all(r.output_ids for r in requests):
        llm.step()
    requests += [llm.add_request(p, GREEDY) for p in prompts[2:]]
    while llm.has_unfinished():
        llm.step()
    # The budget held in every step, but for a step's one new prompt that fits prefill_chunk: it runs whole.
    assert all(tokens <= 12 - decoding or (chunks == 1 and tokens <= 24) for tokens, decoding, chunks, _ in seen)
    assert any(decoding >= 2 and tokens == 12 - decoding for tokens, decoding, _, _ in seen)  # and was used
    # No prompt that fits prefill_chunk (24 tokens) was split: the 9-, 7- and 5-token prompts went in whole, and
    # only the longer ones have continuation chunks.
    first = [n for _, _, _, sizes in seen for n, done in sizes if done == 0]
    later = [n for _, _, _, sizes in seen for n, done in sizes if done > 0]
    assert len(first) == 6 and all(first.count(n) >= 1 for n in (9, 7, 5))
    assert later and sum(first) + sum(later) == 9 + 7 + 40 + 33 + 25 + 5
    assert [r.output_ids for r in requests] == [o.token_ids for o in free]  # exact: the same tokens
    assert llm.cache.free_page_count() == llm.initial_free_pages


def test_without_a_budget_prefill_takes_its_chunk_whatever_decodes():
    model = dmc_model("llama", window=4)
    llm = _engine(model, prefill_chunk=24)
    seen = _record_prefill(llm)
    first = llm.add_request(_prompts([6])[0], GREEDY)
    while not first.output_ids:
        llm.step()
    for p in _prompts([40, 30], seed=1):
        llm.add_request(p, GREEDY)
    while llm.has_unfinished():
        llm.step()
    assert max(tokens for tokens, decoding, _, _ in seen if decoding) == 24


def test_a_budget_below_max_num_seqs_is_refused():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens must be an integer >= max_num_seqs \(8"):
        _engine(dmc_model("llama"), max_num_batched_tokens=4)


def test_cli_flag_errors_name_the_flags(tmp_path):
    model = dmc_model("llama")
    model.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "dmc.cli.main", "generate", str(tmp_path), "--prompt", "hi",
                          "--max-num-batched-tokens", "4", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--max-num-batched-tokens must be >= --max-num-seqs (256)" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_defaults_to_a_step_budget():
    from dmc.cli.main import build_parser
    args = build_parser().parse_args(["serve", "somewhere"])
    assert args.max_num_batched_tokens == 2048
    assert build_parser().parse_args(["generate", "somewhere", "--prompt", "x"]).max_num_batched_tokens is None


def test_a_prefill_delay_gathers_arriving_prompts_into_one_forward(monkeypatch):
    """With prefill_delay_factor, prompts arriving one by one while others decode wait (up to the factor times the
    last prefill's time) and are prefilled together; the outputs are those of admitting them at once."""
    import dmc.engine.scheduler as scheduler_module

    model = dmc_model("llama", window=4)
    prompts = _prompts([6, 9, 7, 8, 5])
    free = _engine(model).generate(prompts, GREEDY)
    clock = [100.0]
    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: clock[0])
    llm = _engine(model, prefill_delay_factor=2.0)
    seen = _record_prefill(llm)
    requests = [llm.add_request(prompts[0], GREEDY)]
    llm.step()  # nothing runs: admitted at once
    assert [len(sizes) for _, _, _, sizes in seen] == [1]
    llm.scheduler.last_prefill_seconds = 1.0  # a prefill forward "takes" 1 s: prompts may wait 2 s
    for p in prompts[1:]:  # one arrives every 0.5 s, each while the first decodes
        requests.append(llm.add_request(p, GREEDY))
        llm.step()
        clock[0] += 0.5
    assert len(seen) == 1  # none admitted yet: the oldest waited 1.5 s < 2 s
    clock[0] += 0.5
    llm.step()
    assert len(seen) == 2 and seen[1][2] == 4  # the four that waited, in one forward
    while llm.has_unfinished():
        llm.step()
    assert [r.output_ids for r in requests] == [o.token_ids for o in free]
    assert llm.cache.free_page_count() == llm.initial_free_pages


def test_a_prefill_delay_does_not_wait_once_the_budget_is_full(monkeypatch):
    import dmc.engine.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: 0.0)  # time stands still
    model = dmc_model("llama", window=4)
    llm = _engine(model, prefill_chunk=16, prefill_delay_factor=10.0)
    seen = _record_prefill(llm)
    first = llm.add_request(_prompts([6])[0], GREEDY)
    llm.step()
    llm.scheduler.last_prefill_seconds = 1.0
    llm.add_request(_prompts([10], seed=1)[0], GREEDY)
    llm.step()
    assert len(seen) == 1  # 10 tokens wait for more
    llm.add_request(_prompts([9], seed=2)[0], GREEDY)
    llm.step()  # 19 >= 16 waiting tokens: the forward is full, no reason to wait
    assert len(seen) == 2 and first.output_ids


def test_a_negative_prefill_delay_is_refused():
    with pytest.raises(ValueError, match=r"prefill_delay_factor must be a number >= 0"):
        _engine(dmc_model("llama"), prefill_delay_factor=-1)
