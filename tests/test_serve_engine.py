"""The server's engine core, in a thread and in a process of its own: one message per engine step holding every
request that changed; the same text and tokens as LLM.generate; a dying engine process ends open requests
with a 503 and refuses new ones (no hang); stop() fails what runs "shutdown" and ends the process; a model that
cannot load is a one-line EngineError."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import dmc  # noqa: E402
from dmc.serve import EngineLoop, EngineProcess, Metrics, ServerConfig, build_app  # noqa: E402
from dmc.serve.engine_core import EngineCore, EngineSpec, Submission  # noqa: E402
from dmc.engine.config import EngineConfig  # noqa: E402
from dmc.engine.step_timer import StepTimer  # noqa: E402
from dmc.serve.engine_loop import EngineError  # noqa: E402

KWARGS = {"device": "cpu", "max_model_len": 256, "max_num_seqs": 8, "cuda_graphs": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_serve import build_model_dir
    return build_model_dir(tmp_path_factory.mktemp("engine") / "tiny")


def params(n: int, seed: int = 0) -> dmc.SamplingParams:
    return dmc.SamplingParams(max_tokens=n, temperature=0.8, seed=seed, ignore_eos=True)


def test_core_sends_one_message_per_step_with_every_changed_request(model_dir):
    llm = dmc.LLM(model_dir, progress=False, **KWARGS)
    prompts = [[5 + i, 9, 11, 40 + i] for i in range(6)]
    wanted = [8, 12, 5, 20, 9, 16]
    reference = llm.generate(prompts, [params(n, s) for s, n in enumerate(wanted)])
    pending = [[("add", [Submission(key=100 + s, prompt_ids=p, params=params(n, s))
                         for s, (p, n) in enumerate(zip(prompts, wanted))])]]
    messages = []
    core = None

    def receive(block: bool) -> list:
        if pending:
            return pending.pop()
        if not core.llm.has_unfinished() and messages:
            return [("stop", None)]
        return []

    llm.step_timer = StepTimer()  # count the core's steps only
    core = EngineCore(llm, receive, messages.append)
    core.run()
    tokens, text, reasons = {}, {}, {}
    for message in messages:
        keys = [o.key for o in message.outputs]
        assert len(keys) == len(set(keys))  # one output per request and step
        for out in message.outputs:
            tokens.setdefault(out.key, []).extend(out.token_ids)
            text[out.key] = text.get(out.key, "") + out.text
            if out.finish_reason is not None:
                reasons[out.key] = out.finish_reason
    assert max(len(m.outputs) for m in messages) >= 4  # several requests share a step's message
    for s, ref in enumerate(reference):
        assert tokens[100 + s] == ref.token_ids
        assert text[100 + s] == ref.text
        assert reasons[100 + s] == "length"
    assert llm.cache.free_page_count() == llm.initial_free_pages  # every page back
    profile = llm.step_timer.summary()  # every step counted, by section
    assert profile["steps"] == sum(1 for m in messages if m.step_seconds) > 0
    assert {"schedule", "prefill", "decode", "postprocess", "outputs", "send"} <= set(profile["ms_per_step"])


async def _stream(client, body):
    """(status, data lines) of a streaming completion."""
    lines = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, [await r.aread()]
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
    return 200, lines


async def _submitted(engine) -> None:
    """Wait until the engine holds a request of the server's (the handle is registered before it is sent)."""
    for _ in range(2000):
        if engine._handles:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no request reached the engine")


def _app(engine, model_dir):
    from transformers import AutoTokenizer
    config = ServerConfig(model_name="m", tokenizer=AutoTokenizer.from_pretrained(model_dir),
                          max_model_len=engine.info["max_model_len"], vocab_size=engine.info["vocab_size"])
    return build_app(engine, config)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_engine_serves_the_same_text_as_llm_generate(model_dir, mode):
    spec = EngineSpec(model_dir, EngineConfig(**KWARGS, seed=0), warmup="off")
    if mode == "process":
        engine = EngineProcess(spec, Metrics("m"))
    else:
        from dmc.serve.engine_core import build_llm
        engine = EngineLoop(lambda: build_llm(spec), Metrics("m"))
    engine.start()
    try:
        app = _app(engine, model_dir)
        body = {"model": "m", "prompt": "def f(x):", "max_tokens": 24, "temperature": 0, "ignore_eos": True}

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                plain = (await c.post("/v1/completions", json=body)).json()
                many = await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(5)])
                return plain, [r.json() for r in many]

        plain, many = asyncio.run(asyncio.wait_for(go(), 120))
        llm = dmc.LLM(model_dir, progress=False, **KWARGS)
        ref = llm.generate(["def f(x):"], dmc.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
        assert plain["choices"][0]["text"] == ref.text
        assert plain["choices"][0]["token_ids"] == ref.token_ids
        assert all(m["choices"][0]["token_ids"] == ref.token_ids for m in many)
        deadline = time.time() + 10
        while engine.snapshot["free_pages"] != engine.snapshot["total_pages"] and time.time() < deadline:
            time.sleep(0.05)
        assert engine.snapshot["free_pages"] == engine.snapshot["total_pages"] is not None
    finally:
        engine.stop()
    profile = engine.profile()
    assert profile["engine"]["steps"] == profile["server"]["steps"] > 0
    assert {"decode", "postprocess", "send"} <= set(profile["engine"]["ms_per_step"])


def test_a_dying_engine_process_gives_503s_not_a_hang(model_dir):
    engine = EngineProcess(EngineSpec(model_dir, EngineConfig(**KWARGS), warmup="off"), Metrics("m"))
    engine.start()
    app = _app(engine, model_dir)
    long = {"model": "m", "prompt": "def", "max_tokens": 250, "ignore_eos": True, "stream": True}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200
            running = asyncio.create_task(_stream(c, long))
            await _submitted(engine)  # 250 tokens take far longer than this kill
            os.kill(engine._process.pid, signal.SIGKILL)
            status, lines = await running
            health = await c.get("/health")
            after = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 4})
            return status, lines, health, after

    status, lines, health, after = asyncio.run(asyncio.wait_for(go(), 60))
    assert status == 200 and lines[-1] == "[DONE]"
    assert any('"engine_unavailable"' in line and "engine process exited" in line for line in lines)
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert after.status_code == 503 and after.json()["error"]["code"] == "engine_unavailable"
    assert not engine.alive
    engine.stop()  # nothing left to stop: returns at once


def test_stop_fails_running_requests_shutdown_and_ends_the_process(model_dir):
    engine = EngineProcess(EngineSpec(model_dir, EngineConfig(**KWARGS), warmup="off"), Metrics("m"))
    engine.start()
    app = _app(engine, model_dir)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            running = asyncio.create_task(c.post("/v1/completions", json={
                "model": "m", "prompt": "def", "max_tokens": 250, "ignore_eos": True}))
            await _submitted(engine)
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            return await running

    response = asyncio.run(asyncio.wait_for(go(), 60))
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert engine._process.exitcode == 0


def test_a_model_that_cannot_load_is_an_engine_error(tmp_path):
    engine = EngineProcess(EngineSpec(str(tmp_path / "missing"), EngineConfig(**KWARGS), warmup="off"), Metrics("m"))
    with pytest.raises(EngineError) as info:
        engine.start()
    assert info.value.kind in ("OSError", "ValueError") and str(info.value)
    assert not engine.alive
