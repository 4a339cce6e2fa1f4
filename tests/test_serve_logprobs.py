"""Log-probabilities over HTTP: completions ``logprobs`` / ``echo`` / ``max_tokens: 0`` and chat ``logprobs`` +
``top_logprobs`` in OpenAI's forms, streamed too, equal to the model's own distribution; and
lm-evaluation-harness's ``local-completions`` model against ``dmc serve`` scoring as the in-process ``dmc``
plugin does (one log-likelihood task, one generation task)."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch  # noqa: E402
from conftest import write_lm_eval_tasks  # noqa: E402
from test_serve import ServerProcess, build_model_dir  # noqa: E402

NAME = "tiny"
PROMPT = "def f(x):\n    return"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("logprobs_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logprobs_log") / "server.log"
    srv = ServerProcess(model_dir, log, "--device", "cpu", "--max-model-len", "256", "--max-num-seqs", "16",
                        "--served-model-name", NAME, "--shutdown-timeout", "2", "--prefill-chunk", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    """``ids -> log_softmax of the HF model's logits after every token`` (full sequence, fp32)."""
    import transformers

    import dmc  # noqa: F401 - registers the DMC model types
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].float(), -1)
    return logprobs, tokenizer


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}/v1/{path}", json={"model": NAME, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v1/{path}", json={"model": NAME, "stream": True, **body},
                      timeout=120) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def same_logprobs(a: dict, b: dict) -> bool:
    """Completions log-probs equal up to float noise (requests chunked differently sum in another order)."""
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert [x is None for x in a["token_logprobs"]] == [x is None for x in b["token_logprobs"]]
    assert [x for x in a["token_logprobs"] if x is not None] == pytest.approx(
        [x for x in b["token_logprobs"] if x is not None], abs=1e-5)
    for x, y in zip(a["top_logprobs"], b["top_logprobs"]):
        assert (x is None) == (y is None)
        if x is not None:
            assert x == pytest.approx(y, abs=1e-5)
    return True


def test_echo_scores_the_prompt_and_the_completion(server, reference):
    logprobs, tokenizer = reference
    ids = tokenizer(PROMPT)["input_ids"]
    out = post(server, "completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                       "logprobs": 2, "echo": True})
    choice = out["choices"][0]
    lp = choice["logprobs"]
    full = ids + choice["token_ids"]
    ref = logprobs(full)
    assert choice["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(full)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(ref[t - 1, full[t]]) for t in range(1, len(full))],
                                                     abs=1e-4)
    assert lp["tokens"] == [tokenizer.decode([t]) for t in full]
    assert lp["text_offset"] == [sum(len(p) for p in lp["tokens"][:i]) for i in range(len(full))]
    for t in range(len(ids), len(full)):  # greedy: the chosen token is the most likely one of its top 2
        top = lp["top_logprobs"][t]
        assert max(top.values()) == lp["token_logprobs"][t] and len(top) == 2

    scored = post(server, "completions", {"prompt": PROMPT, "max_tokens": 0, "logprobs": 1, "echo": True})
    choice = scored["choices"][0]
    assert choice["text"] == PROMPT and choice["token_ids"] == [] and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == lp["token_logprobs"][:len(ids)]
    assert scored["usage"]["completion_tokens"] == 0

    plain = post(server, "completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                         "logprobs": 0})["choices"][0]
    assert plain["text"] == out["choices"][0]["text"][len(PROMPT):]
    assert plain["logprobs"]["token_logprobs"] == lp["token_logprobs"][len(ids):]
    assert all(len(top) == 1 for top in plain["logprobs"]["top_logprobs"])  # the chosen token's only


def test_batch_n_and_streaming_logprobs(server):
    body = {"prompt": [PROMPT, "import os"], "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 3,
            "echo": True, "n": 2}
    out = post(server, "completions", body)
    assert sorted(c["index"] for c in out["choices"]) == [0, 1, 2, 3]
    by_index = {c["index"]: c for c in out["choices"]}
    assert same_logprobs(by_index[0]["logprobs"], by_index[1]["logprobs"])  # greedy choices of one prompt agree
    streamed: dict[int, dict] = {}
    for chunk in events(server, "completions", body):
        for choice in chunk["choices"]:
            got = streamed.setdefault(choice["index"], {"text": "", "tokens": [], "token_logprobs": [],
                                                        "top_logprobs": [], "text_offset": []})
            got["text"] += choice["text"]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                got[key] += choice["logprobs"][key]
    for index, choice in by_index.items():
        assert streamed[index].pop("text") == choice["text"]
        assert same_logprobs(streamed[index], choice["logprobs"])


def test_chat_logprobs(server, reference):
    logprobs, tokenizer = reference
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    out = post(server, "chat/completions", body)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] == entry["logprob"]
    assert "".join(e["token"] for e in content) == out["choices"][0]["message"]["content"]
    streamed = [e for chunk in events(server, "chat/completions", body) for c in chunk["choices"]
                for e in (c["logprobs"] or {}).get("content", [])]
    assert streamed == content
    no_top = post(server, "chat/completions", {**body, "top_logprobs": None})["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in no_top] == [e["logprob"] for e in content]
    assert all(e["top_logprobs"] == [] for e in no_top)


def test_what_cannot_be_done_is_a_400_naming_the_field(server):
    def error(path: str, body: dict) -> dict:
        response = httpx.post(f"{server.url}/v1/{path}", json={"model": NAME, **body}, timeout=60)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert error("completions", {"prompt": "x", "max_tokens": 0})["param"] == "max_tokens"
    assert error("completions", {"prompt": "x", "logprobs": 21})["param"] == "logprobs"
    assert error("completions", {"prompt": "x", "best_of": 3})["param"] == "best_of"
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert error("chat/completions", {**chat, "top_logprobs": 2})["param"] == "top_logprobs"
    assert error("chat/completions", {**chat, "logprobs": True, "top_logprobs": 21})["param"] == "top_logprobs"


# ---------------------------------------------------------------------- lm-evaluation-harness over HTTP
DOCS = [{"q": f"item {i}: def f(x):", "choices": ["    return x + 1", "print(os.getcwd())"], "label": i % 2}
        for i in range(6)]


def _tasks(root) -> str:
    """A multiple-choice task (log-likelihood requests) and a greedy generation task over a local JSONL file."""
    return str(write_lm_eval_tasks(root, DOCS, "serve", kinds=("mc", "gen")))


def test_lm_eval_local_completions_scores_as_the_in_process_plugin(server, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import dmc.eval.harness  # noqa: F401 - registers --model dmc
    tasks = TaskManager(include_path=_tasks(tmp_path), include_defaults=False)
    names = ["serve_mc", "serve_gen"]
    # The tokenizer is the model directory's (no hub download); token ids go over the wire, as lm-eval sends them.
    over_http = lm_eval.simple_evaluate(
        model="local-completions", tasks=names, task_manager=tasks, log_samples=True,
        model_args=f"model={NAME},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={model_dir},num_concurrent=1,max_retries=1,tokenized_requests=True")
    in_process = lm_eval.simple_evaluate(model="dmc", model_args=f"pretrained={model_dir}", tasks=names,
                                         task_manager=tasks, device="cpu", batch_size=4, log_samples=True)
    for task in names:
        assert over_http["results"][task] == pytest.approx(in_process["results"][task], abs=1e-6), task
    # per request: every continuation's log-likelihood within numerical noise, the same greedy bits and texts
    http = {s["doc_id"]: s["resps"] for s in over_http["samples"]["serve_mc"]}
    local = {s["doc_id"]: s["resps"] for s in in_process["samples"]["serve_mc"]}
    assert len(local) == len(http) == len(DOCS) and "acc,none" in over_http["results"]["serve_mc"]
    for doc, resps in local.items():
        for (ll, greedy), (ll_http, greedy_http) in zip((r[0] for r in resps), (r[0] for r in http[doc])):
            assert float(ll_http) == pytest.approx(float(ll), abs=1e-4)
            assert bool(greedy_http) == bool(greedy)
    texts = {s["doc_id"]: s["resps"] for s in over_http["samples"]["serve_gen"]}
    assert texts == {s["doc_id"]: s["resps"] for s in in_process["samples"]["serve_gen"]}
