"""The client against the in-process fake server: what it sends, what it measures, and how it fails."""

import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

from specrelay.loadgen.client import ChatRequest, EndpointError, OpenAIClient, api_base, discover_model

MESSAGES = [{"role": "user", "content": "hello there"}]


async def chat(url, req=None, **client_kw):
    async with aiohttp.ClientSession() as session:
        client = OpenAIClient(session, url, "fake-model", **client_kw)
        return await client.chat(req or ChatRequest(messages=MESSAGES, max_tokens=16, slo_class="interactive"))


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_body_is_openai_clean_and_the_slo_travels_in_headers(serve_fake, fake):
    url, state = await serve_fake()
    req = ChatRequest(messages=MESSAGES, max_tokens=16, slo_class="deadline", deadline_ms=2500.7,
                      tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                      seed=3)
    result = await chat(url, req, api_key="sk-test")
    assert result.ok, result.error
    body, headers = state.bodies[0], state.headers[0]
    assert set(body) <= set(CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tool_choice"] == "auto" and body["seed"] == 3 and body["max_tokens"] == 16
    assert headers["X-SLO-Class"] == "deadline" and headers["X-Deadline-Ms"] == "2500"
    assert headers["Authorization"] == "Bearer sk-test"


async def test_slo_fields_go_in_the_body_only_when_asked(serve_fake):
    url, state = await serve_fake()
    await chat(url, ChatRequest(messages=MESSAGES, max_tokens=4, slo_class="batch", deadline_ms=900.0),
               slo_in_body=True)
    assert state.bodies[0]["slo_class"] == "batch" and state.bodies[0]["deadline_ms"] == 900
    assert state.headers[0]["X-SLO-Class"] == "batch"


async def test_timings_and_usage_are_measured_from_the_stream(serve_fake, fake):
    url, _ = await serve_fake(fake.FakeBehaviour(num_tokens=6, tokens_per_chunk=2, ttft_s=0.05, token_delay_s=0.02))
    r = await chat(url)
    assert r.ok and r.stream.finish_reason == "stop"
    assert r.stream.content == " tok0 tok1 tok2 tok3 tok4 tok5"
    assert r.completion_tokens == 6 and r.stream.usage["prompt_tokens"] == 2
    assert r.ttft_ms >= 70  # 50 ms before the role chunk, 20 ms before the first token chunk
    assert len(r.itl_ms) == 2 and all(x >= 15 for x in r.itl_ms)  # three chunks of two tokens
    assert r.tpot_ms == pytest.approx((r.e2e_ms - r.ttft_ms) / 5)


async def test_usage_pte_is_read_when_reported(serve_fake, fake):
    url, _ = await serve_fake(fake.FakeBehaviour(pte={"total": 42.5, "full_eviction": 90}))
    r = await chat(url)
    assert r.pte == (42.5, {"total": 42.5, "full_eviction": 90.0})


async def test_http_errors_are_results_not_exceptions(serve_fake, fake):
    url, _ = await serve_fake(fake.FakeBehaviour(error_every=1))
    r = await chat(url)
    assert not r.ok and r.http_status == 500 and r.error == "HTTP 500: injected failure"


async def test_a_stream_that_ends_before_done_is_a_failure(serve_fake, fake):
    url, _ = await serve_fake(fake.FakeBehaviour(num_tokens=8, break_every=1))
    r = await chat(url)
    assert not r.ok and r.error == "stream closed before [DONE]"
    assert r.stream.content == " tok0 tok1 tok2 tok3"  # what arrived is kept


async def test_a_dropped_connection_is_a_failure():
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n')
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        r = await chat(f"http://127.0.0.1:{server.port}")
    assert not r.ok and r.error.startswith(("stream broken", "stream closed before [DONE]"))
    assert r.ttft_ms is not None


async def test_a_non_streaming_answer_is_a_failure():
    async def handler(request):
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        r = await chat(f"http://127.0.0.1:{server.port}")
    assert not r.ok and r.error.startswith("not a stream")


async def test_a_slow_server_times_out(serve_fake, fake):
    url, _ = await serve_fake(fake.FakeBehaviour(ttft_s=2.0))
    r = await chat(url, request_timeout_s=0.1)
    assert not r.ok and r.error == "timeout after 0.1s"


async def test_connection_refused_is_a_failed_request_and_a_clear_endpoint_error():
    url = f"http://127.0.0.1:{closed_port()}"
    r = await chat(url)
    assert not r.ok and r.error.startswith("connection failed")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(EndpointError, match="cannot reach"):
            await discover_model(session, url)


@pytest.mark.parametrize("status, body, message", [
    (200, "<html>hello</html>", "did not return an OpenAI model list"),
    (404, "Not Found", "answered HTTP 404"),
    (200, '{"object": "list", "data": []}', "serves no models"),
])
async def test_a_server_that_is_not_openai_is_a_clear_endpoint_error(status, body, message):
    async def handler(request):
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_get("/v1/models", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        with pytest.raises(EndpointError, match=message):
            await discover_model(session, f"http://127.0.0.1:{server.port}")


async def test_discover_model_lists_the_models(serve_fake):
    url, _ = await serve_fake()
    async with aiohttp.ClientSession() as session:
        assert await discover_model(session, url + "/v1/") == ["fake-model"]


@pytest.mark.parametrize("endpoint, base", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
])
def test_api_base_accepts_a_root_or_v1(endpoint, base):
    assert api_base(endpoint) == base


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8000", "ftp://x", "http://"])
def test_api_base_rejects_what_is_not_an_http_url(endpoint):
    with pytest.raises(EndpointError, match="not an http"):
        api_base(endpoint)
