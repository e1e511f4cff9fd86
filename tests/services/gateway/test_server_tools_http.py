"""Server-side tools over HTTP, in front of the fake verifier (which holds no KV, so every round goes the fallback
way: a fresh Generate of the whole conversation): the server runs the call and the client sees the answer, never a
tool_calls entry for the server's tool; a malformed call is reported, not raised; a tool the client declares stays
the client's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import replace

from specrelay.services.gateway import create_app
from specrelay.services.gateway.tool_rounds import ServerTools
from specrelay.services.toolcoord.tools.registry import Tool, ToolRegistry
from specrelay.shared.bus import LocalBus

from .conftest import fake_verifier

MODEL = "tiny-chat"
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CLIENT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": PARAMS}}


def _registry(calls: list[dict], down: bool = False) -> ToolRegistry:
    def get_weather(city: str) -> str:
        calls.append({"city": city})
        if down:
            raise ConnectionError("the weather service is down")
        return '{"temperature": 18}'

    registry = ToolRegistry()
    registry.register(Tool("get_weather", "Get the current weather for a city", PARAMS, get_weather))
    return registry


@contextlib.asynccontextmanager
async def served(tokenizer, config, calls, registry: ToolRegistry | None = None, continue_timeout_s: float = 5.0,
                 **fake_settings):
    from aiohttp.test_utils import TestClient, TestServer

    bus = LocalBus()
    fake = fake_verifier.FakeVerifier(bus, tokenizer, **fake_settings)
    task = asyncio.create_task(fake.run())
    registry = registry or _registry(calls)
    app = create_app(config, bus, tokenizer, server_tools=ServerTools(registry, registry, max_rounds=2,
                                                                      continue_timeout_s=continue_timeout_s))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client, fake
    finally:
        await client.close()
        await bus.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, from a Prometheus text exposition."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _events(text: str) -> list[dict]:
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def test_the_server_runs_its_tool_and_answers(tokenizer, base_config):
    calls: list[dict] = []
    async with served(tokenizer, base_config, calls) as (client, fake):
        body = {"model": MODEL, "messages": WEATHER}
        data = await (await client.post("/v1/chat/completions", json=body)).json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"] == 'The weather in Paris: {"temperature": 18}.'
        assert "tool_calls" not in choice["message"]
        [ran] = choice["message"]["server_tool_calls"]
        assert ran["function"]["name"] == "get_weather" and json.loads(ran["function"]["arguments"]) == {
            "city": "Paris"}
        assert ran["output"] == '{"temperature": 18}' and ran["round"] == 1 and not ran["is_error"]
        assert data["usage"]["tool_rounds"] == 1 and calls == [{"city": "Paris"}]
        # The server's schema was in the prompt; the second turn's prompt holds the call and its answer.
        first, second = [tokenizer.decode(g.prompt_token_ids) for g in fake.generates[-2:]]
        assert '"name": "get_weather"' in first and "<tool_response>" in second
        assert fake.generates[-2].hold_s > 0  # the verifier was asked to keep the KV for the round
        # this verifier held nothing: the whole conversation was sent again, flagged as evicted for usage.pte
        assert fake.generates[-1].evicted_tokens == len(fake.generates[-2].prompt_token_ids) + len(
            tokenizer.encode(fake_verifier.TOOL_CALL)) and fake.generates[-1].evicted_tokens > 0

        stream = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}})
        chunks = _events(await stream.text())
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any("tool_calls" in d for d in deltas)  # the server's call never looks like the client's
    assert "".join(d.get("content") or "" for d in deltas) == choice["message"]["content"]
    assert [d["server_tool_calls"][0]["output"] for d in deltas if "server_tool_calls" in d] == [ran["output"]]
    assert chunks[-1]["usage"]["tool_rounds"] == 1


async def test_n_choices_each_run_their_own_tool_rounds(tokenizer, base_config):
    calls: list[dict] = []
    async with served(tokenizer, base_config, calls) as (client, fake):
        body = {"model": MODEL, "messages": WEATHER, "n": 2}
        data = await (await client.post("/v1/chat/completions", json=body)).json()
        stream = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = _events(await stream.text())
    assert [c["message"]["content"] for c in data["choices"]] == ['The weather in Paris: {"temperature": 18}.'] * 2
    assert data["usage"]["tool_rounds"] == 2 and len(calls) == 4  # one round per choice, whole and streamed
    for index in (0, 1):
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == index]
        assert "".join(ch["delta"].get("content") or "" for ch in mine) == data["choices"][index]["message"]["content"]
    assert len({g.request_id for g in fake.generates}) == len(fake.generates)  # every turn of every choice its own


async def test_a_malformed_server_tool_call_is_reported_not_raised(tokenizer, base_config):
    calls: list[dict] = []
    async with served(tokenizer, base_config, calls) as (client, fake):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "BROKEN weather"}]}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status == 200
        data = await response.json()
        stream = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = _events(await stream.text())
    message = data["choices"][0]["message"]
    assert data["choices"][0]["finish_reason"] == "stop" and message["content"] == "Let me look."
    [error] = message["tool_call_errors"]
    assert "not valid JSON" in error["message"] and '"city": }' in error["raw"]
    assert data["usage"]["tool_rounds"] == 0 and calls == []
    errors = [e for c in chunks if c["choices"] for e in c["choices"][0]["delta"].get("tool_call_errors") or []]
    assert [e["message"] for e in errors] == [error["message"]] and "index" not in errors[0]


async def test_a_tool_the_client_declares_is_the_clients(tokenizer, base_config):
    calls: list[dict] = []
    async with served(tokenizer, base_config, calls) as (client, _):
        data = await (await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": WEATHER, "tools": [CLIENT_TOOL]})).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and calls == []
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    assert "server_tool_calls" not in choice["message"]


async def test_tool_choice_none_offers_no_server_tools(tokenizer, base_config):
    async with served(tokenizer, base_config, []) as (client, fake):
        data = await (await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": WEATHER, "tool_choice": "none", "max_tokens": 8})).json()
        assert "<tools>" not in tokenizer.decode(fake.generates[-1].prompt_token_ids)
    assert "server_tool_calls" not in data["choices"][0]["message"]


async def test_tools_can_run_in_a_toolcoord_process_over_the_bus(tokenizer, base_config):
    """`--remote-tools`: the gateway keeps the schemas and sends each call to `specrelay toolcoord` (here its
    serving loop on the same bus)."""
    from aiohttp.test_utils import TestClient, TestServer

    from specrelay.services.toolcoord.service import RemoteTools, serve_toolcoord

    calls: list[dict] = []
    bus = LocalBus()
    fake = fake_verifier.FakeVerifier(bus, tokenizer)
    tasks = [asyncio.create_task(fake.run()),
             asyncio.create_task(serve_toolcoord(bus, _registry(calls), "toolcoord-test"))]
    local_schemas = _registry([])  # the gateway's copy: never called
    app = create_app(base_config, bus, tokenizer,
                     server_tools=ServerTools(local_schemas, RemoteTools(bus, timeout_s=5.0)))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        data = await (await client.post("/v1/chat/completions", json={"model": MODEL, "messages": WEATHER})).json()
    finally:
        await client.close()
        await bus.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == [{"city": "Paris"}]
    assert data["choices"][0]["message"]["content"] == 'The weather in Paris: {"temperature": 18}.'


async def test_metrics_count_tool_rounds_calls_malformed_calls_and_fallbacks(tokenizer, base_config):
    calls: list[dict] = []
    async with served(tokenizer, base_config, calls) as (client, _):
        for content in ("What's the weather in Paris?", "BROKEN weather", "What's the weather in Paris?"):
            response = await client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": content}]})
            assert response.status == 200
        metrics = _metrics(await (await client.get("/metrics")).text())
    assert metrics["specrelay_tool_rounds_total"] == 2 and len(calls) == 2
    assert metrics['specrelay_server_tool_calls_total{outcome="ok",tool="get_weather"}'] == 2
    assert metrics["specrelay_tool_call_errors_total"] == 1  # the BROKEN call
    # the fake verifier holds no KV: each round went again as a whole
    assert metrics['specrelay_tool_fallbacks_total{reason="not_held"}'] == 2

    async with served(tokenizer, base_config, [], registry=_registry([], down=True)) as (client, _):
        data = await (await client.post("/v1/chat/completions", json={"model": MODEL, "messages": WEATHER})).json()
        metrics = _metrics(await (await client.get("/metrics")).text())
    [ran] = data["choices"][0]["message"]["server_tool_calls"]
    assert ran["is_error"] and "the weather service is down" in ran["output"]
    assert metrics['specrelay_server_tool_calls_total{outcome="error",tool="get_weather"}'] == 1
    assert 'specrelay_server_tool_calls_total{outcome="ok",tool="get_weather"}' not in metrics
    assert metrics["specrelay_tool_rounds_total"] == 1 and metrics["specrelay_tool_call_errors_total"] == 0


async def test_a_continue_nobody_answers_falls_back_to_a_fresh_generate(tokenizer, base_config):
    """The verifier that held the turn is gone: nothing reads its Continue stream. After --tool-continue-timeout-s
    the gateway cancels the Continue and sends the whole conversation as a fresh Generate."""
    config = replace(base_config, chunk_timeout_s=60.0)  # the wait is the Continue's own, not any chunk's
    async with served(tokenizer, config, [], continue_timeout_s=0.3, holder="verifier-gone") as (client, fake):
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": WEATHER})
        assert response.status == 200, await response.text()
        assert time.monotonic() - started < 10.0
        data = await response.json()
        metrics = _metrics(await (await client.get("/metrics")).text())
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == 'The weather in Paris: {"temperature": 18}.'
    assert data["usage"]["tool_rounds"] == 1
    first, fresh = fake.generates
    assert data["id"] == first.request_id
    assert "<tool_response>" in tokenizer.decode(fresh.prompt_token_ids) and fresh.evicted_tokens > 0
    # The unanswered Continue was cancelled (a holder still alive lets the KV go); the fresh turn runs under its
    # own id, out of that Cancel's reach, and is released at the end.
    assert fresh.request_id != first.request_id and fake.cancels == [first.request_id, fresh.request_id]
    assert metrics['specrelay_tool_fallbacks_total{reason="continue_timeout"}'] == 1
    assert 'specrelay_tool_fallbacks_total{reason="not_held"}' not in metrics
