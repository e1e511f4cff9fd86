"""OpenAI parameters are honoured or refused with a 400 naming them, never accepted and ignored."""

from __future__ import annotations

import json

import pytest

MODEL = "tiny-chat"  # conftest's
HELLO = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

REFUSED_CHAT = [
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
    ("function_call", {"name": "f"}),
    ("logprobs", 3),  # chat's logprobs is a boolean; the number of alternatives is top_logprobs
    ("top_logprobs", 2),  # without logprobs: true
    ("top_logprobs", 21),
    ("n", 0),
    ("n", 1000),
    ("logit_bias", {"50256": -100}),  # beyond the tokenizer's vocabulary (600)
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {"5": 1e9}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("web_search_options", {}),
    ("store", True),
    ("metadata", {"k": "v"}),
    ("service_tier", "flex"),
    ("presence_penalty", 0.5),
]
REFUSED_COMPLETION = [("best_of", 2), ("logprobs", 6), ("logprobs", True), ("top_logprobs", 2), ("n", 0), ("n", 17),
                      ("logit_bias", {"-1": 5}), ("echo", True), ("suffix", "x")]


@pytest.mark.parametrize("field,value", REFUSED_CHAT, ids=[f"{f}={v}" for f, v in REFUSED_CHAT])
async def test_chat_refuses_what_it_cannot_honour_naming_the_field(gateway, field, value):
    response = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "tools": [TOOL], field: value})
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error" and error["message"]
    assert not gateway.fake.generates  # nothing reached the verifier


@pytest.mark.parametrize("field,value", REFUSED_COMPLETION, ids=[f"{f}={v}" for f, v in REFUSED_COMPLETION])
async def test_completions_refuse_what_they_cannot_honour(gateway, field, value):
    response = await gateway.client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", field: value})
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["param"] == field


async def test_values_that_change_nothing_are_accepted(gateway):
    response = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "max_tokens": 3, "logprobs": False, "top_logprobs": 0, "n": 1,
        "logit_bias": {"5": 0}, "modalities": ["text"], "service_tier": "auto", "store": False, "metadata": {},
        "user": "u-1", "prompt_cache_key": "k", "safety_identifier": "s"})
    assert response.status == 200, await response.text()
    response = await gateway.client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                                  "best_of": 1})
    assert response.status == 200, await response.text()


async def test_ignore_eos_sends_no_stop_token_to_the_verifier(gateway):
    for ignore_eos, path, body in ((None, "/v1/chat/completions", {"messages": HELLO}),
                                   (True, "/v1/chat/completions", {"messages": HELLO}),
                                   (True, "/v1/completions", {"prompt": "Hi"})):
        response = await gateway.client.post(path, json={"model": MODEL, "max_tokens": 4, "ignore_eos": ignore_eos,
                                                         **body})
        assert response.status == 200, await response.text()
        sampling = gateway.fake.generates[-1].sampling
        assert (sampling.stop_token_ids == []) == bool(ignore_eos)


TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>')
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_calls_false_returns_at_most_one_call(gateway, monkeypatch, stream):
    from .conftest import fake_verifier

    monkeypatch.setattr(fake_verifier.FakeVerifier, "reply_text", lambda self, prompt: TWO_CALLS)

    async def cities(parallel: bool | None) -> list[str]:
        response = await gateway.client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris and Lyon?"}],
            "tools": [WEATHER], "parallel_tool_calls": parallel, "stream": stream})
        if not stream:
            calls = (await response.json())["choices"][0]["message"]["tool_calls"]
            return [json.loads(c["function"]["arguments"])["city"] for c in calls]
        pieces: dict[int, str] = {}
        for line in (await response.text()).splitlines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    for call in choice["delta"].get("tool_calls", []):
                        pieces[call["index"]] = pieces.get(call["index"], "") + call["function"]["arguments"]
        return [json.loads(pieces[i])["city"] for i in sorted(pieces)]

    assert await cities(None) == ["Paris", "Lyon"]
    assert await cities(False) == ["Paris"]
    for parallel, expected in ((None, ["Paris", "Lyon"]), (False, ["Paris"])):
        response = await gateway.client.post("/v1/responses", json={
            "model": MODEL, "input": "Weather in Paris and Lyon?", "stream": stream,
            "tools": [{"type": "function", **WEATHER["function"]}], "parallel_tool_calls": parallel})
        text = await response.text()
        final = json.loads(text) if not stream else json.loads(text.strip().rsplit("data: ", 1)[1])["response"]
        assert [json.loads(i["arguments"])["city"] for i in final["output"] if i["type"] == "function_call"] == expected
        assert ("Lyon" in text) == (parallel is None)  # not in any streamed event either
