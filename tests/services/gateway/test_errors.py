"""Bad requests get a 400 in OpenAI's error shape naming the field, other failures their own status, and the
server keeps answering afterwards."""

from __future__ import annotations

import asyncio
import json

import pytest

from specrelay.services.gateway.state import GATEWAY

MODEL = "tiny-chat"
HELLO = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


def body(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 8, **fields}


async def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


BAD_CHAT = [
    ("invalid JSON", b'{"model": "tiny-chat", "messages": [', None, "invalid_json"),
    ("empty body", b"", None, "invalid_json"),
    ("not an object", b"[1, 2]", None, "invalid_value"),
    ("wrong type", body(max_tokens="eight"), "max_tokens", "invalid_value"),
    ("wrong type nested", body(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_value"),
    ("unknown role", body(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", "invalid_value"),
    ("missing messages", {"model": MODEL}, None, "invalid_value"),
    ("empty messages", body(messages=[]), "messages", "invalid_value"),
    ("unknown model", body(model="gpt-9"), "model", "model_not_found"),
    ("negative max_tokens", body(max_tokens=-3), "max_tokens", "invalid_value"),
    ("zero max_completion_tokens", body(max_completion_tokens=0), "max_completion_tokens", "invalid_value"),
    ("temperature out of range", body(temperature=3.5), "temperature", "invalid_value"),
    ("top_p zero", body(top_p=0), "top_p", "invalid_value"),
    ("n=0", body(n=0), "n", "invalid_value"),
    ("n past the limit", body(n=1000), "n", "invalid_value"),
    ("unknown response_format", body(response_format={"type": "xml"}), "response_format.type", "invalid_value"),
    ("a schema that does not compile", body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}), "response_format.json_schema.schema", "invalid_value"),
    ("top_logprobs past 20", body(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    ("top_logprobs without logprobs", body(top_logprobs=3), "top_logprobs", "invalid_value"),
    ("logit_bias key not a token id", body(logit_bias={"abc": 1}), "logit_bias", "invalid_value"),
    ("logit_bias past 100", body(logit_bias={"5": 1e9}), "logit_bias", "invalid_value"),
    ("five stop strings", body(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
    ("tool without function", body(tools=[{"type": "function"}]), "tools[0]", "invalid_value"),
    ("tool name with spaces", body(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     "tools[0].function.name", "invalid_value"),
    ("tool parameters not an object schema",
     body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "tools[0].function.parameters", "invalid_value"),
    ("duplicate tool names", body(tools=[TOOL, TOOL]), "tools", "invalid_value"),
    ("tool_choice names an absent tool",
     body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     "invalid_value"),
    ("bad slo_class", body(slo_class="urgent"), "slo_class", "invalid_value"),
    ("prompt longer than the context", body(messages=[{"role": "user", "content": "Hello there " * 400}]),
     "messages", "context_length_exceeded"),
    ("max_tokens past the context", body(max_tokens=10_000), "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize("name,payload,param,code", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
async def test_bad_chat_requests_are_400s_and_the_server_keeps_serving(gateway, name, payload, param, code):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = await gateway.client.post("/v1/chat/completions", data=data,
                                         headers={"Content-Type": "application/json"})
    await assert_error(response, 400, param, code)
    assert gateway.fake.generates == []  # nothing reached the verifier
    ok = await gateway.client.post("/v1/chat/completions", json=body())
    assert ok.status == 200
    assert (await ok.json())["choices"][0]["message"]["content"]


BAD_COMPLETION = [
    ("empty prompt", {"prompt": ""}, "prompt", "invalid_value"),
    ("several prompts", {"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    ("token id out of range", {"prompt": [1, 2, 10**9]}, "prompt", "invalid_value"),
    ("echo", {"prompt": "hi", "echo": True}, "echo", "unsupported_value"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, "max_tokens", "invalid_value"),
]


@pytest.mark.parametrize("name,fields,param,code", BAD_COMPLETION, ids=[c[0] for c in BAD_COMPLETION])
async def test_bad_completion_requests_are_400s(gateway, name, fields, param, code):
    response = await gateway.client.post("/v1/completions", json={"model": MODEL, **fields})
    await assert_error(response, 400, param, code)


async def test_slo_headers_are_checked(gateway):
    response = await gateway.client.post("/v1/chat/completions", json=body(), headers={"X-Deadline-Ms": "soon"})
    await assert_error(response, 400, "X-Deadline-Ms")
    response = await gateway.client.post("/v1/chat/completions", json=body(), headers={"X-SLO-Class": "vip"})
    await assert_error(response, 400, "X-SLO-Class")


async def test_unknown_routes_and_methods_answer_in_the_same_shape(gateway):
    await assert_error(await gateway.client.get("/v1/engines"), 404, code="not_found")
    await assert_error(await gateway.client.get("/v1/models/gpt-9"), 404, "model", "model_not_found")
    response = await gateway.client.get("/v1/chat/completions")
    await assert_error(response, 405, code="method_not_allowed")
    assert "POST" in response.headers["Allow"]


async def test_api_keys(make_gateway):
    async with make_gateway(api_keys=("sk-one", "sk-two")) as h:
        error = await assert_error(await h.client.post("/v1/chat/completions", json=body()), 401,
                                   code="invalid_api_key")
        assert "Bearer" in error["message"]
        wrong = await h.client.get("/v1/models", headers={"Authorization": "Bearer sk-three"})
        await assert_error(wrong, 401, code="invalid_api_key")
        assert wrong.headers["WWW-Authenticate"] == "Bearer"
        for key in ("sk-one", "sk-two"):
            ok = await h.client.post("/v1/chat/completions", json=body(),
                                     headers={"Authorization": f"Bearer {key}"})
            assert ok.status == 200
        assert (await h.client.get("/health")).status == 200  # probes and scrapers need no key
        assert (await h.client.get("/metrics")).status == 200


async def test_a_verifier_error_is_a_500_or_an_error_event_and_the_server_goes_on(gateway):
    failing = body(messages=[{"role": "user", "content": "please FAIL now"}])
    error = await assert_error(await gateway.client.post("/v1/chat/completions", json=failing), 500,
                               code="generation_error")
    assert error["type"] == "server_error" and "CUDA fell over" in error["message"]
    response = await gateway.client.post("/v1/chat/completions", json={**failing, "stream": True})
    assert response.status == 200  # the stream had started
    events = [line[6:] for line in (await response.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "generation_error"
    assert (await gateway.client.post("/v1/chat/completions", json=body())).status == 200


async def test_a_full_queue_answers_503(make_gateway):
    async with make_gateway(max_running=1, max_queued=1, delay_s=0.05) as h:
        long = body(max_tokens=40)

        async def status() -> int:
            return (await h.client.post("/v1/chat/completions", json=long)).status

        first, second = asyncio.create_task(status()), asyncio.create_task(status())
        while h.app[GATEWAY].admission.num_waiting < 1:
            await asyncio.sleep(0.01)
        refused = await h.client.post("/v1/chat/completions", json=long)
        error = await assert_error(refused, 503, code="server_overloaded")
        assert error["type"] == "service_unavailable"
        assert refused.headers["Retry-After"] == "1"
        assert await asyncio.gather(first, second) == [200, 200]
        assert "specrelay_admission_rejected_total 1.0\n" in await (await h.client.get("/metrics")).text()


async def test_an_internal_failure_shows_no_trace_and_the_server_goes_on(gateway, monkeypatch):
    from specrelay.services.gateway import responses

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals at 0xdeadbeef")

    monkeypatch.setattr(responses, "usage_to_openai", broken)
    error = await assert_error(await gateway.client.post("/v1/chat/completions", json=body()), 500,
                               code="internal_error")
    assert "0xdeadbeef" not in error["message"]
    streamed = await gateway.client.post("/v1/chat/completions", json=body(stream=True))
    assert streamed.status == 200
    text = await streamed.text()
    assert "0xdeadbeef" not in text and "Traceback" not in text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "internal_error" and events[-1] == "[DONE]"
    monkeypatch.undo()
    assert (await gateway.client.post("/v1/chat/completions", json=body())).status == 200
