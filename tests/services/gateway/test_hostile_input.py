"""Input that used to crash a handler (a 500) is a 400 in OpenAI's error shape, and valid OpenAI input that used to
be refused is served (issue 18, defect 5). The server answers a normal request afterwards every time."""

from __future__ import annotations

import asyncio
import json

import pytest

from .test_errors import assert_error

MODEL = "tiny-chat"
HELLO = [{"role": "user", "content": "Hello there"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def post_raw(gateway, path: str, data: bytes):
    return await gateway.client.post(path, data=data, headers={"Content-Type": "application/json"})


async def assert_400(response, param: str | None = None, code: str | None = None) -> dict:
    error = await assert_error(response, 400, param, code)
    assert error["type"] == "invalid_request_error"
    return error


async def assert_serving(gateway) -> None:
    ok = await gateway.client.post("/v1/chat/completions", json=chat())
    assert ok.status == 200, await ok.text()
    assert (await ok.json())["choices"][0]["message"]["content"]


DEEP = [
    ("ignored field", lambda d: f'{{"model": "{MODEL}", "messages": [], "junk": {nested(d)}}}'),
    ("tool parameters", lambda d: json.dumps(chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": "@"}}}])).replace('"@"', nested(d))),
    ("response_format", lambda d: json.dumps(chat(response_format={"type": "text", "x": "@"})).replace(
        '"@"', nested(d))),
]


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("where,make", DEEP, ids=[d[0] for d in DEEP])
async def test_json_nested_past_the_parser_is_a_400(gateway, where, make, depth):
    await assert_400(await post_raw(gateway, "/v1/chat/completions", make(depth).encode()), code="invalid_json")
    await assert_400(await post_raw(gateway, "/v1/completions", make(depth).replace(
        '"messages": ', '"prompt": "hi", "x": ').encode()), code="invalid_json")
    await assert_serving(gateway)


async def test_free_form_json_nested_deeper_than_a_schema_needs_is_a_400(gateway):
    body = json.dumps(chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": "@"}}}])).replace('"@"', nested(200))
    await assert_400(await post_raw(gateway, "/v1/chat/completions", body.encode()),
                     param="tools[0].function.parameters", code="invalid_value")
    await assert_serving(gateway)


@pytest.mark.parametrize("field,value", [("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 10**40),
                                         ("top_k", 2**63), ("top_k", 10**40), ("top_k", -2)])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_integers_beyond_64_bits_are_400s(gateway, field, value, path):
    body = chat(**{field: value}) if "chat" in path else {"model": MODEL, "prompt": "hi", field: value}
    await assert_400(await post_raw(gateway, path, json.dumps(body).encode()), param=field, code="invalid_value")
    assert gateway.fake.generates == []
    await assert_serving(gateway)


async def test_the_widest_seeds_and_top_k_reach_the_verifier(gateway):
    for seed, top_k, sent_top_k in ((2**63 - 1, 2**63 - 1, 2**63 - 1), (-(2**63), -1, 0)):
        response = await gateway.client.post("/v1/chat/completions", json=chat(seed=seed, top_k=top_k))
        assert response.status == 200, await response.text()
        sampling = gateway.fake.generates[-1].sampling
        assert (sampling.seed, sampling.top_k) == (seed, sent_top_k)


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """One HTTP/1.1 request written byte for byte (a client library would refuse these header bytes)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("token", [b"\xff\xfe", b"caf\xe9", b"\xed\xa0\x80", b"sk-1\x80"])
async def test_an_authorization_header_that_is_not_utf8_is_a_401(make_gateway, token):
    async with make_gateway(api_keys=("sk-1",)) as h:
        body = json.dumps(chat()).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + token + b"\r\n")
        status, answer = await raw_request(h.url, head, body)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        ok = await h.client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-1"})
        assert ok.status == 200


NULLS = ["n", "stream", "stream_options", "temperature", "top_p", "seed", "stop", "max_tokens", "logprobs",
         "presence_penalty", "frequency_penalty", "logit_bias", "user", "response_format", "top_k"]


async def test_null_is_accepted_wherever_openai_allows_it(gateway):
    nulls = dict.fromkeys(NULLS)
    response = await gateway.client.post("/v1/chat/completions", json={
        **chat(), **nulls, "max_completion_tokens": None, "tools": None, "tool_choice": None,
        "parallel_tool_calls": None})
    assert response.status == 200, await response.text()
    assert (await response.json())["object"] == "chat.completion"
    response = await gateway.client.post("/v1/completions", json={
        "model": MODEL, "prompt": "hi", **nulls, "max_tokens": 4, "echo": None, "suffix": None})
    assert response.status == 200, await response.text()
    assert (await response.json())["object"] == "text_completion"
    streamed = await gateway.client.post("/v1/chat/completions", json={
        **chat(), "stream": True, "stream_options": {"include_usage": None}})
    assert streamed.status == 200 and (await streamed.text()).rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("nesting", [1, 2])
async def test_a_prompt_of_token_ids_in_either_form_is_served(gateway, tokenizer, nesting):
    ids = tokenizer.encode("Hello there", False)
    prompt = ids if nesting == 1 else [ids]  # [[ids]]: OpenAI's batch of one tokenized prompt
    response = await gateway.client.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                                   "max_tokens": 3})
    assert response.status == 200, await response.text()
    assert gateway.fake.generates[-1].prompt_token_ids == ids
    assert (await response.json())["choices"][0]["text"]


@pytest.mark.parametrize("prompt,code", [([[1, 2], [3]], "unsupported_value"), (["a", "b"], "unsupported_value"),
                                         ([[1, "a"]], "invalid_value"), ([True, 2], "invalid_value"),
                                         ([[[1]]], "invalid_value"), ([[]], "invalid_value"), ([], "invalid_value")])
async def test_prompts_we_cannot_serve_are_named(gateway, prompt, code):
    response = await gateway.client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    await assert_400(response, param="prompt", code=code)


async def test_an_assistant_refusal_is_history_like_any_reply(gateway, tokenizer):
    for assistant in ({"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help."}]},
                      {"role": "assistant", "content": None, "refusal": "I cannot help."}):
        messages = [*HELLO, assistant, {"role": "user", "content": "Why?"}]
        response = await gateway.client.post("/v1/chat/completions", json=chat(messages=messages))
        assert response.status == 200, await response.text()
        prompt = tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
        assert "<|im_start|>assistant\nI cannot help.<|im_end|>" in prompt


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "x\\ud83dy", "\\ude00\\ud83d"])
async def test_a_lone_surrogate_escape_becomes_the_replacement_character(gateway, tokenizer, escape):
    body = f'{{"model": "{MODEL}", "max_tokens": 4, "messages": [{{"role": "user", "content": "hi {escape}!"}}]}}'
    response = await post_raw(gateway, "/v1/chat/completions", body.encode())
    assert response.status == 200, await response.text()
    prompt = tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    expected = json.loads(f'"{escape}"').encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert f"hi {expected}!" in prompt and "\ufffd" in expected
    # a proper pair is still the character it encodes
    pair = f'{{"model": "{MODEL}", "max_tokens": 4, "messages": [{{"role": "user", "content": "\\ud83e\\udd16"}}]}}'
    response = await post_raw(gateway, "/v1/chat/completions", pair.encode())
    assert response.status == 200
    assert "🤖" in tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)


NOT_JSON = [b'{"model": "tiny-chat", "messages": [], "temperature": NaN}',
            b'{"model": "tiny-chat", "x": "\\ud800", "messages": [',
            b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\xff"}]}']


@pytest.mark.parametrize("body", NOT_JSON)
async def test_bodies_that_are_not_json_stay_400s(gateway, body):
    await assert_400(await post_raw(gateway, "/v1/chat/completions", body), code="invalid_json")
