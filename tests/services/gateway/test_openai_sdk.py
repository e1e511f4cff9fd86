"""The official `openai` SDK against a live server: `SPECRELAY_TEST_SERVER_URL` (e.g. a running `specrelay serve`,
with `SPECRELAY_TEST_API_KEY` if it needs one) or, by default, the gateway + fake verifier on a real port.
Every assertion holds for any correct server and model under greedy decoding."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import aiohttp
import openai
import pytest

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
STORY = [{"role": "user", "content": "Tell me a short story about a robot."}]
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
GREEDY = {"temperature": 0.0, "seed": 0}


@pytest.fixture
async def client(live_server_url):
    async with openai.AsyncOpenAI(base_url=f"{live_server_url}/v1", max_retries=0, timeout=60,
                                  api_key=os.environ.get("SPECRELAY_TEST_API_KEY", "unused")) as c:
        yield c


@pytest.fixture
async def model(client) -> str:
    return (await client.models.list()).data[0].id


async def metric(live_server_url: str, name: str) -> float | None:
    return (await metrics(live_server_url, name))[0]


async def metrics(live_server_url: str, *names: str) -> list[float | None]:
    """Several gauges from one scrape, so they describe the same moment."""
    async with aiohttp.ClientSession() as s, s.get(f"{live_server_url}/metrics") as r:
        text = await r.text()
    found = [re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE) for name in names]
    return [None if match is None else float(match.group(1)) for match in found]


async def running_blocks(live_server_url: str) -> float:
    """KV blocks of the requests being served: blocks in use less those of conversations kept across a tool pause
    (an earlier test's tool call may keep its conversation, and the server may let it go at any moment)."""
    used, kept = await metrics(live_server_url, "specrelay_kv_blocks_used", "specrelay_kv_blocks_kept")
    assert used is not None, "the server must expose specrelay_kv_blocks_used (pass kv_stats to create_app)"
    return used - (kept or 0)


async def test_chat(client, model):
    r = await client.chat.completions.create(model=model, messages=STORY, max_tokens=16, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_streamed_deltas_reassemble_to_the_greedy_text(client, model):
    whole = await client.chat.completions.create(model=model, messages=STORY, max_tokens=24, **GREEDY)
    stream = await client.chat.completions.create(model=model, messages=STORY, max_tokens=24, stream=True,
                                                  **GREEDY)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.id == chunks[0].id for c in chunks)


async def test_max_tokens_ends_with_length(client, model):
    r = await client.chat.completions.create(model=model, messages=STORY, max_completion_tokens=3, **GREEDY)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


async def test_stop_sequences(client, model):
    text = (await client.chat.completions.create(model=model, messages=STORY, max_tokens=32, **GREEDY)
            ).choices[0].message.content
    words = [w for w in text.split() if len(w) >= 3]
    assert len(words) >= 2, f"the model said too little to pick a stop sequence: {text!r}"
    stop = words[len(words) // 2]
    expected = text[:text.find(stop)]
    r = await client.chat.completions.create(model=model, messages=STORY, max_tokens=32, stop=[stop, "\u2603"],
                                             **GREEDY)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(model=model, messages=STORY, max_tokens=32, stop=stop,
                                                  stream=True, **GREEDY)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == expected


async def test_usage_with_include_usage(client, model):
    stream = await client.chat.completions.create(model=model, messages=STORY, max_tokens=8, stream=True,
                                                  stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in body)
    assert last.usage.prompt_tokens > 0 and 0 < last.usage.completion_tokens <= 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.prompt_tokens_details.cached_tokens <= last.usage.prompt_tokens
    plain = await client.chat.completions.create(model=model, messages=STORY, max_tokens=8, stream=True, **GREEDY)
    assert all(getattr(c, "usage", None) is None for c in [c async for c in plain])


async def test_tool_round_trip(client, model):
    first = await client.chat.completions.create(model=model, messages=WEATHER, tools=[WEATHER_TOOL],
                                                 max_tokens=64, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages = WEATHER + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id,
                           "content": json.dumps({"temperature": 18, "condition": "sunny"})}]
    second = await client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                                  max_tokens=48, **GREEDY)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.content and not answer.message.tool_calls


async def test_streamed_tool_call_deltas(client, model):
    whole = await client.chat.completions.create(model=model, messages=WEATHER, tools=[WEATHER_TOOL],
                                                 max_tokens=64, **GREEDY)
    stream = await client.chat.completions.create(model=model, messages=WEATHER, tools=[WEATHER_TOOL],
                                                  max_tokens=64, stream=True, **GREEDY)
    calls: dict[int, dict] = {}
    finish = None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            if piece.index not in calls:  # the first piece of a call names it
                assert piece.id and piece.type == "function" and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    expected = whole.choices[0].message.tool_calls
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in expected]


async def test_bad_requests_are_400_and_the_server_keeps_serving(client, model):
    cases = [
        (dict(model="no-such-model", messages=STORY), "model"),
        (dict(model=model, messages=[]), "messages"),
        (dict(model=model, messages=STORY, max_tokens=-1), "max_tokens"),
        (dict(model=model, messages=STORY, tools=[{"type": "function", "function": {"name": "two words"}}]),
         "tools[0].function.name"),
        (dict(model=model, messages=[{"role": "user", "content": "word " * 100_000}]), "messages"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(**kwargs)
        assert info.value.status_code == 400
        assert info.value.body["param"] == param and info.value.body["message"]
    r = await client.chat.completions.create(model=model, messages=STORY, max_tokens=4, **GREEDY)
    assert r.choices[0].message.content


async def test_leaving_mid_stream_frees_the_kv_blocks(client, model, live_server_url):
    deadline = time.monotonic() + 60
    while await metric(live_server_url, "specrelay_requests_running"):  # earlier tests' requests are finishing
        assert time.monotonic() < deadline, "the server never became idle"
        await asyncio.sleep(0.05)
    baseline = await running_blocks(live_server_url)
    gone_before = await metric(live_server_url, 'specrelay_request_finish_total{reason="client_gone"}') or 0
    stream = await client.chat.completions.create(model=model, messages=STORY, max_tokens=300, stream=True,
                                                  **GREEDY)
    seen = 0
    async for chunk in stream:
        seen += 1
        if seen == 3:
            break
    assert await running_blocks(live_server_url) > baseline
    await stream.close()
    deadline = time.monotonic() + 60
    while await running_blocks(live_server_url) > baseline:
        assert time.monotonic() < deadline, "the request's KV blocks were not freed after the client left"
        await asyncio.sleep(0.05)
    assert await metric(live_server_url, 'specrelay_request_finish_total{reason="client_gone"}') == gone_before + 1
