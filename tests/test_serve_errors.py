"""The server's 400s for bodies pydantic refuses, in the client's terms: a body that is no JSON, a prompt that is
none of its forms or holds ids outside the vocabulary (the app alone: nothing reaches the engine)."""

from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from dmc.serve import EngineLoop, Metrics, ServerConfig, build_app  # noqa: E402


def post(body: bytes | dict) -> httpx.Response:
    app = build_app(EngineLoop(lambda: None, Metrics("m")),
                    ServerConfig(model_name="m", tokenizer=None, max_model_len=64, vocab_size=300))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            if isinstance(body, bytes):
                return await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            return await c.post("/v1/completions", json=body)
    return asyncio.run(go())


def test_malformed_json_says_so():
    r = post(b'{"model": "m", "prompt": "x",,}')
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("the request body is not valid JSON (")
    assert error["message"].endswith("at character 29): send one JSON object")
    assert error["param"] is None and error["code"] == "invalid_json"


@pytest.mark.parametrize("prompt", [[-1], [5, -1], [[1, 2], [-3]]])
def test_negative_token_ids_name_the_vocabulary(prompt):
    r = post({"model": "m", "prompt": prompt})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "prompt token ids must be in [0, 300)", "type": "invalid_request_error",
                                 "param": "prompt", "code": None}


@pytest.mark.parametrize("prompt", [{"text": "x"}, 3.5, [1.5], [None]])
def test_a_prompt_of_no_accepted_form_says_which_forms(prompt):
    r = post({"model": "m", "prompt": prompt})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == "prompt must be text, a list of token ids, or a list (a batch) of either"
    assert error["param"] == "prompt"


def test_other_fields_keep_their_messages():
    r = post({"model": "m", "prompt": "x", "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert r.json()["error"]["message"].startswith("n: Input should be greater than or equal to 1")
