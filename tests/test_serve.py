"""`dmc serve`: a real server process on 127.0.0.1 with a tiny DMC model (CPU), driven by the official
`openai` client, raw HTTP for the errors, 64 concurrent streaming clients, schemathesis fuzzing
and SIGTERM. One server for the module (starting one costs ~15 s on 2 slow cores); the SIGTERM test
stops it, so it runs last."""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY, NAME = "test-key", "tiny"
TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "hello world, the quick brown fox\n"] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
AUTH = {"Authorization": f"Bearer {KEY}"}


def build_model_dir(path):
    """A tiny DMC model (2 layers, hidden 32) whose decisions merge a good share of tokens, with a BPE
    tokenizer and a chat template."""
    import transformers
    from conftest import drive_merges

    import dmc
    from dmc.tiny import write_tiny_model_dir

    write_tiny_model_dir(path, TEXTS, vocab_size=300, hidden=32, max_positions=256)
    model = dmc.convert(transformers.AutoModelForCausalLM.from_pretrained(path),
                        dmc.DMCConfig(window=4, init_offset=1.0))
    drive_merges(model, shift=1.5)
    model.save_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str, log_path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmc.cli.main", "serve", model_dir, "--port", str(self.port), *args],
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"server did not come up:\n{self.log()}")

    def log(self) -> str:
        return open(self.log_path).read()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        pattern = rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$"
        values = [float(v) for v in re.findall(pattern, text, re.M)]
        return sum(values)

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Health once nothing runs and every page is back (or the last health seen)."""
        deadline = time.time() + timeout
        while True:
            health = self.health()
            if (health["running"] == health["waiting"] == 0 and health["free_pages"] == health["total_pages"]) \
                    or time.time() > deadline:
                return health
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    srv = ServerProcess(model_dir, log, "--device", "cpu", "--max-model-len", "256", "--max-num-seqs", "96",
                        "--api-key", KEY, "--served-model-name", NAME, "--shutdown-timeout", "2",
                        "--max-body-mib", "0.25")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def greedy(**kw) -> dict:
    return dict(temperature=0, extra_body={"ignore_eos": True, **kw.pop("extra_body", {})}, **kw)


# ---------------------------------------------------------------------- the official client
def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_usage_and_compression(client, tokenizer):
    out = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=12, **greedy())
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.prompt_tokens == len(tokenizer("def f(x):")["input_ids"])
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert len(choice.model_extra["token_ids"]) == 12
    assert tokenizer.decode(choice.model_extra["token_ids"], skip_special_tokens=True) == choice.text
    cr = choice.model_extra["dmc_compression"]
    assert cr["cr"] > 1.2 and len(cr["per_layer_cr"]) == 2  # the tiny model merges: real compression
    assert out.model_extra["dmc_compression"]["cr"] == pytest.approx(cr["cr"])


def test_token_id_prompts_batch_and_n(client):
    out = client.completions.create(model=NAME, prompt=[[1, 50, 60], [1, 70]], n=2, max_tokens=5,
                                    temperature=0.9, seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 20
    # choice j of a prompt samples with seed + j: the same as a single request with that seed
    single = client.completions.create(model=NAME, prompt=[1, 70], max_tokens=5, temperature=0.9, seed=4,
                                       extra_body={"ignore_eos": True})
    assert out.choices[3].model_extra["token_ids"] == single.choices[0].model_extra["token_ids"]
    assert out.choices[2].model_extra["token_ids"] != out.choices[3].model_extra["token_ids"]


def test_seed_reproducible(client):
    def run(seed):
        return client.completions.create(model=NAME, prompt="import os", max_tokens=16, temperature=1.0, top_p=0.95,
                                         seed=seed, extra_body={"ignore_eos": True, "top_k": 50}).choices[0].text
    a, b, c = run(11), run(11), run(12)
    assert a == b and a != c


def test_stop_strings_and_token_ids(client):
    full = client.completions.create(model=NAME, prompt="hello", max_tokens=20, **greedy())
    ids, text = full.choices[0].model_extra["token_ids"], full.choices[0].text
    # a stop token ends the request (kept in the output), at its first occurrence
    stop_id = ids[5]
    out = client.completions.create(model=NAME, prompt="hello", max_tokens=20, **greedy(extra_body={
        "stop_token_ids": [stop_id]}))
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["token_ids"] == ids[:ids.index(stop_id) + 1]
    # a stop string cuts the text before it, streamed or not
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    out = client.completions.create(model=NAME, prompt="hello", max_tokens=20, stop=[stop], **greedy())
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == text[:text.find(stop)]
    chunks = list(client.completions.create(model=NAME, prompt="hello", max_tokens=20, stop=stop, stream=True,
                                            **greedy()))
    assert "".join(c.choices[0].text for c in chunks) == text[:text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_completion_matches_non_streaming(client):
    ref = client.completions.create(model=NAME, prompt="def f", max_tokens=10, **greedy())
    chunks = list(client.completions.create(model=NAME, prompt="def f", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **greedy()))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.choices[0].text
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == \
        ref.choices[0].model_extra["token_ids"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens
    assert chunks[-1].model_extra["dmc_compression"]["cr"] > 1


def test_stream_without_usage_ends_with_done(server):
    body = {"model": NAME, "prompt": "def", "max_tokens": 3, "stream": True, "ignore_eos": True}
    lines = [l for l in httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).text
             .splitlines() if l]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(l[6:]) for l in lines[:-1])


def test_chat(client, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, **greedy())
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert out.usage.completion_tokens == 8 and out.model_extra["dmc_compression"]["cr"] > 1
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    n2 = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=4, n=2, seed=5,
                                        temperature=1.0)
    assert [c.index for c in n2.choices] == [0, 1] and n2.usage.completion_tokens <= 8


# ---------------------------------------------------------------------- errors (raw HTTP)
def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_errors(server):
    url = f"{server.url}/v1/completions"
    ok = {"model": NAME, "prompt": "def f", "max_tokens": 4}
    post = lambda body, headers=AUTH, **kw: httpx.post(url, json=body, headers=headers, timeout=60, **kw)  # noqa: E731
    assert error_of(post(ok, headers={}), 401)["code"] == "invalid_api_key"
    error_of(post(ok, headers={"Authorization": "Bearer nope"}), 401)
    assert error_of(post({**ok, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    assert error_of(post({**ok, "temperature": -1}), 400)["param"] == "temperature"
    assert error_of(post({**ok, "top_p": 0}), 400)["param"] == "top_p"
    error_of(post({**ok, "max_tokens": 0}), 400)
    error_of(post({**ok, "n": 0}), 400)
    error_of(post({**ok, "prompt": []}), 400)
    error_of(post({**ok, "prompt": [1, 99999]}), 400)
    error_of(post({**ok, "stop": [""]}), 400)
    error_of(post({"prompt": "x"}), 400)  # no model
    assert error_of(post({**ok, "suffix": "x"}), 400)["param"] == "suffix"
    error_of(post({**ok, "presence_penalty": 0.5}), 400)
    too_long = error_of(post({**ok, "prompt": [1] * 250, "max_tokens": 10}), 400)
    assert too_long["code"] == "context_length_exceeded" and "256" in too_long["message"]
    error_of(post({**ok, "prompt": [1] * 300}), 400)
    error_of(httpx.post(url, content=b"{not json", headers={**AUTH, "content-type": "application/json"}), 400)
    error_of(post({**ok, "prompt": "x" * 300_000}), 413)  # over --max-body-mib 0.25
    chat = f"{server.url}/v1/chat/completions"
    error_of(httpx.post(chat, json={"model": NAME, "messages": []}, headers=AUTH), 400)
    error_of(httpx.post(chat, json={"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, headers=AUTH), 400)
    assert error_of(httpx.post(chat, json={"model": NAME, "tools": [{"type": "function"}], "messages": [
        {"role": "user", "content": "hi"}]}, headers=AUTH), 400)["param"] == "tools"
    error_of(httpx.get(f"{server.url}/v1/nothing", headers=AUTH), 404)
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    assert server.wait_idle()["free_pages"] == server.health()["total_pages"]


def test_errors_do_not_disturb_a_running_stream(server):
    body = {"model": NAME, "prompt": "import os", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    ref = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120).json()
    tokens = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                tokens += json.loads(line[6:])["choices"][0]["token_ids"]
                if len(tokens) == 3:  # mid-stream: a burst of bad requests
                    for bad in ({"model": NAME, "prompt": [1] * 300}, {"model": "x", "prompt": "a"},
                                {"model": NAME, "prompt": "a", "top_p": 7}):
                        assert httpx.post(f"{server.url}/v1/completions", json=bad, headers=AUTH).status_code < 500
    assert tokens == ref["choices"][0]["token_ids"]


def test_no_chat_template_and_draining_in_process(tokenizer):
    """The app alone (no engine needed: both are refused before anything is queued)."""
    from dmc.serve import EngineLoop, Metrics, ServerConfig, build_app

    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    config = ServerConfig(model_name="m", tokenizer=plain, max_model_len=64, vocab_size=300)
    app = build_app(EngineLoop(lambda: None, Metrics("m")), config)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert error_of(r, 400)["code"] == "no_chat_template"
            config.draining = True
            error_of(await c.post("/v1/completions", json={"model": "m", "prompt": "x"}), 503)
            assert (await c.get("/health")).status_code == 503
    asyncio.run(go())


def test_metrics(server):
    before = server.metric("dmc_generation_tokens_total")
    body = {"model": NAME, "prompt": "def", "max_tokens": 16, "n": 4, "ignore_eos": True}
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("dmc_requests_running", "dmc_requests_waiting", "dmc_prompt_tokens_total", "dmc_generation_tokens_total",
                 "dmc_kv_pages_used", "dmc_kv_pages_free", "dmc_realized_compression_ratio", "dmc_preemptions_total",
                 "dmc_time_to_first_token_seconds_bucket", "dmc_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert server.metric("dmc_generation_tokens_total") - before == 64
    assert server.metric("dmc_realized_compression_ratio") > 1.2
    assert server.metric("dmc_time_to_first_token_seconds_count") >= 4
    assert server.metric("dmc_inter_token_latency_seconds_count") >= 60


# ---------------------------------------------------------------------- load
def load_requests(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """A mix of prompt lengths (1-60 tokens) and generation lengths (1-16), greedy and seeded sampling."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 3, 8, 20, 60]))]
        body = {"model": NAME, "prompt": prompt, "max_tokens": rng.choice([1, 2, 4, 8, 16]),
                "ignore_eos": rng.random() < 0.7}
        if rng.random() < 0.5:
            body.update(temperature=0.9, top_p=0.9, seed=1000 + i)
        else:
            body.update(temperature=0)
        out.append(body)
    return out


async def stream_request(client, body: dict, read_chunks: int | None = None):
    """Stream one completion; with ``read_chunks``, hang up after that many chunks (returns None)."""
    tokens, text, finish, chunks = [], [], None, 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return {"token_ids": tokens, "text": "".join(text), "finish_reason": finish}
            choice = json.loads(line[6:])["choices"][0]
            tokens += choice["token_ids"]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
            chunks += 1
            if read_chunks is not None and chunks >= read_chunks:
                return None
    raise AssertionError("stream ended without data: [DONE]")


def test_load_64_concurrent_streams_match_one_at_a_time(server, tokenizer):
    start = server.wait_idle()
    requests = load_requests(64, len(tokenizer))

    async def wave():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(stream_request(c, body) for body in requests))

    results = asyncio.run(wave())
    assert all(r["finish_reason"] in ("length", "stop") for r in results)
    assert server.metric("dmc_requests_running_peak") >= 16  # batched together, not one after another
    idle = server.wait_idle()
    assert idle["free_pages"] == start["free_pages"] == idle["total_pages"]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        for body, got in zip(requests, results):  # the same requests, one at a time
            alone = c.post("/v1/completions", json=body).json()["choices"][0]
            assert got["token_ids"] == alone["token_ids"], body
            assert got["text"] == alone["text"] and got["finish_reason"] == alone["finish_reason"]


def test_disconnects_free_pages(server):
    start = server.wait_idle()
    aborted = server.metric("dmc_requests_total", 'finish_reason="aborted"')
    long = [{"model": NAME, "prompt": [5 + i, 9, 11], "max_tokens": 200, "ignore_eos": True, "temperature": 0}
            for i in range(32)]

    async def wave():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300,
                                     limits=httpx.Limits(max_connections=200)) as c:
            hang_ups = [stream_request(c, body, read_chunks=2) for body in long[:28]]

            async def impatient(body):  # a non-streaming client that gives up
                with pytest.raises(httpx.ReadTimeout):
                    # 0.25 s: far less than 200 tokens take beside 31 other streams (1 s was once enough for them)
                    await c.post("/v1/completions", json=body, timeout=0.25)
            return await asyncio.gather(*hang_ups, *(impatient(body) for body in long[28:]))

    asyncio.run(wave())
    idle = server.wait_idle(30)
    assert idle["running"] == idle["waiting"] == 0
    assert idle["free_pages"] == start["free_pages"] == idle["total_pages"]
    assert server.metric("dmc_requests_total", 'finish_reason="aborted"') - aborted == 32  # none ran to the end
    # A streaming client that leaves is logged as a non-streaming one that leaves: 499, finish=client gone.
    gone = [line for line in server.log().splitlines() if "POST /v1/completions 499 " in line]
    assert len(gone) >= 32 and all("finish=client gone" in line for line in gone)


def test_load_generator_script(server, tmp_path):
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, "benchmarks/serve_load.py", "--url", server.url, "--api-key", KEY, "--clients", "4",
                    "--requests", "8", "--prompt-lens", "4,16", "--gen-lens", "2,6", "--vocab-size", "300",
                    "--warmup", "0", "--out", str(out)], check=True, capture_output=True, timeout=300,
                   cwd=pathlib.Path(__file__).resolve().parents[1])
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["failed"] == 0 and result["meta"]["device"]
    assert result["output_tokens_per_s"] > 0 and result["ttft_s"]["p50"] > 0 and result["itl_s"]["p99"] > 0
    assert result["peak_running_server"] >= 4 and result["realized_cr"] > 1 and result["preemptions"] == 0


def test_load_generator_text_prompts(server, model_dir, tokenizer, tmp_path):
    """--prompt-text: every prompt is a window of the files' token stream (by the model's tokenizer), of a length
    of the mix, and the run completes against the server; a stream shorter than the longest prompt is refused."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import serve_load

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(TEXTS) * 3)
    (corpus / "b.bin").write_bytes(b"\xff\xfe\x00")  # not UTF-8: skipped
    stream = tokenizer(" ".join(TEXTS) * 3 + "\n", add_special_tokens=False)["input_ids"]
    args = SimpleNamespace(prompt_text=[str(corpus)], tokenizer=None, model=str(model_dir))
    prompts = serve_load.text_prompts(args, random.Random(0), [4, 16, 16])
    assert [len(p) for p in prompts] == [4, 16, 16]
    assert all(any(stream[i:i + len(p)] == p for i in range(len(stream))) for p in prompts)
    with pytest.raises(SystemExit, match="fewer than the longest prompt"):
        serve_load.text_prompts(args, random.Random(0), [len(stream) + 1])
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, "benchmarks/serve_load.py", "--url", server.url, "--api-key", KEY, "--clients", "2",
                    "--requests", "4", "--prompt-lens", "4,16", "--gen-lens", "2", "--warmup", "0", "--prompt-text",
                    str(corpus), "--tokenizer", str(model_dir), "--out", str(out)], check=True, capture_output=True,
                   timeout=300, cwd=pathlib.Path(__file__).resolve().parents[1])
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["prompts"] == f"windows of {corpus}"


def test_warmup_at_startup(model_dir, tmp_path):
    """--warmup on (auto: on CUDA only) runs LLM.warmup before the server answers: logged with the buckets it ran,
    every page free after it, and requests are served as usual."""
    srv = ServerProcess(model_dir, tmp_path / "warm.log", "--device", "cpu", "--max-model-len", "256", "--warmup", "on")
    try:
        assert re.search(r"warmed up in [0-9.]+ s: prompt lengths \[128, 254\]", srv.log())
        health = srv.health()
        assert health["free_pages"] == health["total_pages"] and health["running"] == 0
        body = {"model": pathlib.Path(model_dir).name, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        assert srv.stop() == 0


# ---------------------------------------------------------------------- fuzzing
def test_fuzz_openapi_schema(server):
    """Schemathesis cases (valid and invalid) for every operation: no 5xx, none hangs, healthy after.
    Generation sizes are clamped so each case stays cheap on a CPU."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    modes = {"POST": (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)}
    seen: dict = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in modes.get(op.method.upper(), (schemathesis.GenerationMode.POSITIVE,)):
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                      derandomize=True)
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                body = case.body
                if isinstance(body, dict):
                    if mode == schemathesis.GenerationMode.POSITIVE:
                        body["model"] = NAME  # else nearly every case stops at the 404
                    if type(body.get("n")) is int:
                        body["n"] = min(body["n"], 2)
                    for key in ("max_tokens", "max_completion_tokens"):  # unset: up to the context (256)
                        if type(body.get(key)) is int or key not in body or body[key] is None:
                            body[key] = min(body.get(key) or 8, 8)
                    if isinstance(body.get("prompt"), list):
                        body["prompt"] = body["prompt"][:3]
                response = case.call(base_url=server.url, headers=AUTH, timeout=60)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (op.label, case.body, response.text)
            check()
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 10  # both kinds really reached the server
    health = server.wait_idle(30)
    assert health["status"] == "ok" and health["free_pages"] == health["total_pages"]


# ---------------------------------------------------------------------- shutdown (stops the module's server)
def test_forced_cr_compresses_every_head_at_that_ratio(model_dir, tmp_path):
    """`--forced-cr` (benchmarks on random weights, as `dmc bench`): every head keeps one slot per r
    tokens, so the response's realized CR is r; a negative value is a one-line error."""
    bad = subprocess.run([sys.executable, "-m", "dmc.cli.main", "serve", model_dir, "--forced-cr", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--forced-cr must be 0 (off) or an integer CR >= 1" in bad.stderr
    srv = ServerProcess(model_dir, tmp_path / "forced.log", "--device", "cpu", "--max-model-len", "256",
                        "--forced-cr", "4")
    try:
        out = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
            "model": pathlib.Path(model_dir).name, "prompt": list(range(5, 69)), "max_tokens": 65,
            "temperature": 0, "ignore_eos": True}).json()
        cr = out["choices"][0]["dmc_compression"]
        assert cr["tokens"] == 64 + 64 and cr["cr"] == pytest.approx(4.0, rel=0.05)
    finally:
        assert srv.stop() == 0


def test_sigterm_with_no_shutdown_time_aborts_running_streams(model_dir, tmp_path):
    """`--shutdown-timeout 0`: SIGTERM cancels a running stream at once (no [DONE]), and the server
    still exits 0 with every page back."""
    srv = ServerProcess(model_dir, tmp_path / "abort.log", "--device", "cpu", "--max-model-len", "256",
                        "--shutdown-timeout", "0")

    async def scenario():
        lines, started = [], asyncio.Event()
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            body = {"model": pathlib.Path(model_dir).name, "prompt": "def", "max_tokens": 250, "n": 4,
                    "ignore_eos": True, "stream": True}

            async def run():
                try:
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                lines.append(line)
                                started.set()
                except httpx.HTTPError:
                    pass  # the connection is cut
            task = asyncio.create_task(run())
            await started.wait()
            srv.proc.send_signal(signal.SIGTERM)
            await task
        return lines

    try:
        lines = asyncio.run(scenario())
        assert lines and lines[-1] != "data: [DONE]" and len(lines) < 4 * 250
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            got = {"short": [], "long": []}
            started = {"short": asyncio.Event(), "long": asyncio.Event()}

            async def run(name, max_tokens):
                body = {"model": NAME, "prompt": "def", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
                try:
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                got[name].append(line)
                                started[name].set()
                except httpx.HTTPError:
                    pass  # the long one is cut when the shutdown timeout expires
                ended[name] = time.time()

            tasks = [asyncio.create_task(run("short", 4)), asyncio.create_task(run("long", 250))]
            await started["short"].wait()
            await started["long"].wait()
            ended["sigterm"] = time.time()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # no new work is accepted
                r = await c.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1})
                assert r.status_code == 503
            except httpx.TransportError:
                pass  # or the listening socket is already closed
            await asyncio.gather(*tasks)
            return got

    t0, ended = time.time(), {}
    got = asyncio.run(scenario())
    assert got["short"][-1] == "data: [DONE]"  # finished within the shutdown timeout
    if got["long"][-1] == "data: [DONE]":  # a fast machine generates all 250 tokens within the 2 s
        assert ended["long"] - ended["sigterm"] < 2 + 1.5
    else:  # aborted when the timeout expired (a timeout of 0: the next test)
        assert len(got["long"]) < 250 and ended["long"] - ended["sigterm"] >= 2 - 0.5
    assert server.proc.wait(30) == 0 and time.time() - t0 < 30
    log = server.log()
    # one line per request, e.g. the short one's
    assert re.search(r"INFO dmc.serve: POST /v1/completions 200 [\d.]+s id=cmpl-\w+ choices=1 prompt_tokens=\d+ "
                     r"completion_tokens=4 total_tokens=\d+ finish=length cr=[\d.]+ ttft=[\d.]+s", log), log[-3000:]
    assert "Application shutdown complete" in log
