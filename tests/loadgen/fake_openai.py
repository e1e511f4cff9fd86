"""A small OpenAI-compatible chat server for the loadgen's end-to-end tests: streams chunks in OpenAI's format,
calls tools when asked to, fails on purpose when told to, and remembers what it was sent.

Run alone (for `loadgen sweep --server-cmd`): `python fake_openai.py --port P --schedule NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL = "fake-model"


@dataclass
class FakeBehaviour:
    num_tokens: int = 8  # per response, capped by max_tokens
    tokens_per_chunk: int = 1
    ttft_s: float = 0.0
    token_delay_s: float = 0.0
    tool_turns: int = 0  # with tools: answer with tool calls until the conversation holds this many tool turns
    parallel_tools: int = 1  # tool calls per tool turn
    error_every: int = 0  # every n-th request gets HTTP 500
    break_every: int = 0  # every n-th request's stream is cut before [DONE]
    pte: Any = None  # reported as usage.pte when set
    max_concurrency: int = 0  # > 0: requests beyond it wait (a server with a fixed batch)
    tag_tokens: bool = False  # tokens name their request (` r3.0 r3.1`), so quoting can be traced


@dataclass
class FakeState:
    behaviour: FakeBehaviour
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    count: int = 0
    slots: asyncio.Semaphore | None = None


STATE = web.AppKey("state", FakeState)


def _chunk(content: dict[str, Any] | None, finish: str | None = None, usage: dict | None = None,
           choices: bool = True) -> bytes:
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": content or {}, "logprobs": None, "finish_reason": finish}] if choices
            else [], "usage": usage}
    return f"data: {json.dumps(body)}\n\n".encode()


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                          "owned_by": "test"}]})


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    b = state.behaviour
    body = await request.json()
    state.bodies.append(body)
    state.headers.append(dict(request.headers))
    state.count += 1
    n = state.count
    if b.error_every and n % b.error_every == 0:
        return web.json_response({"error": {"message": "injected failure", "type": "server_error"}}, status=500)
    if state.slots is None and b.max_concurrency:
        state.slots = asyncio.Semaphore(b.max_concurrency)
    if state.slots is not None:
        async with state.slots:
            return await _stream(request, state, body, n)
    return await _stream(request, state, body, n)


async def _stream(request: web.Request, state: FakeState, body: dict[str, Any], n: int) -> web.StreamResponse:
    b = state.behaviour
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await asyncio.sleep(b.ttft_s)
    num_tool_results = sum(m.get("role") == "tool" for m in body["messages"])
    num_tool_turns = sum(bool(m.get("tool_calls")) for m in body["messages"])
    prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    if body.get("tools") and num_tool_turns < b.tool_turns:
        calls = [(i, f"call_{n}_{i}", body["tools"][i % len(body["tools"])]["function"]["name"])
                 for i in range(b.parallel_tools)]
        await resp.write(_chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": i, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
            for i, cid, name in calls]}))
        for i, _, _ in calls:
            for part in ('{"query": ', f'"step {num_tool_results}"', "}"):
                await asyncio.sleep(b.token_delay_s)
                await resp.write(_chunk({"tool_calls": [{"index": i, "function": {"arguments": part}}]}))
        completion_tokens, finish = 3 * len(calls), "tool_calls"
    else:
        completion_tokens = min(b.num_tokens, body.get("max_tokens") or b.num_tokens)
        await resp.write(_chunk({"role": "assistant", "content": ""}))
        for start in range(0, completion_tokens, b.tokens_per_chunk):
            if b.break_every and n % b.break_every == 0 and start >= completion_tokens // 2:
                return resp  # the connection ends mid-answer
            word = f"r{n}." if b.tag_tokens else "tok"
            text = "".join(f" {word}{i}" for i in range(start, min(start + b.tokens_per_chunk, completion_tokens)))
            await asyncio.sleep(b.token_delay_s)
            await resp.write(_chunk({"content": text}))
        finish = "length" if completion_tokens == body.get("max_tokens") else "stop"
    await resp.write(_chunk({}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if b.pte is not None:
            usage["pte"] = b.pte
        await resp.write(_chunk(None, usage=usage, choices=False))
    await resp.write(b"data: [DONE]\n\n")
    return resp


def make_app(behaviour: FakeBehaviour | None = None) -> web.Application:
    app = web.Application()
    app[STATE] = FakeState(behaviour or FakeBehaviour())
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--schedule", default="fcfs")
    parser.add_argument("--token-delay", type=float, default=0.002)
    args = parser.parse_args()
    # The two "policies" differ only in speed, so a sweep test can tell their curves apart.
    delay = args.token_delay if args.schedule == "fcfs" else args.token_delay / 2
    web.run_app(make_app(FakeBehaviour(num_tokens=6, token_delay_s=delay, max_concurrency=4)),
                host="127.0.0.1", port=args.port, print=None)
