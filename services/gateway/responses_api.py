"""`POST /v1/responses`: OpenAI's Responses API, stateless, on the chat pipeline.

validate (responses_input.py) -> translate to a chat request -> the chat handler's own steps (check, render,
admit, turns) -> shape the output (responses_output.py) as one `response` object or as Responses streaming events
(`event: <type>` + `data: {..., "sequence_number"}`, no `[DONE]`, as OpenAI streams them).
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from aiohttp import web

from specrelay.services.gateway.chat_plan import plan_chat
from specrelay.services.gateway.checks import check_chat
from specrelay.services.gateway.errors import ApiError, bad_request
from specrelay.services.gateway.exchange import admitted, check_model
from specrelay.services.gateway.generation import Timing
from specrelay.services.gateway.responses_input import FunctionChoice, ResponsesRequest, check_responses, to_chat
from specrelay.services.gateway.responses_output import OutputBuilder, responses_usage
from specrelay.services.gateway.schemas import decode
from specrelay.services.gateway.sse import SseWriter, drain, stream
from specrelay.services.gateway.state import GATEWAY, Gateway
from specrelay.services.gateway.streamer import CLIENT_CLOSED, finish
from specrelay.services.gateway.tool_rounds import ChatPlan, ChatTurns

_encoder = msgspec.json.Encoder()


async def create_response(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    timing = Timing()
    req = decode(await request.read(), ResponsesRequest)
    check_responses(req)
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise bad_request(f"max_output_tokens must be at least 1, got {req.max_output_tokens}",
                          param="max_output_tokens", code="invalid_value")
    chat = to_chat(req)
    max_tokens = check_chat(chat)
    check_model(gw, req.model)
    plan = await plan_chat(gw, request, chat, max_tokens, timing, id_prefix="resp")
    shape = Shape(req, plan)
    async with admitted(gw, plan.prep.ticket):
        turns = ChatTurns(plan)
        if req.stream:
            return await _stream(gw, request, shape, turns)
        return await _complete(gw, shape, turns)


class Shape:
    """The `response` object's fields that the request fixes; `body` adds what the generation made."""

    def __init__(self, req: ResponsesRequest, plan: ChatPlan):
        prep = plan.prep
        sampling = prep.generate.sampling
        choice = req.tool_choice
        self.id, self.prep, self.plan = prep.request_id, prep, plan
        self.fixed: dict[str, Any] = {
            "id": prep.request_id, "object": "response", "created_at": prep.created, "model": req.model,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "text": {"format": {"type": "text"}},
            "tool_choice": msgspec.to_builtins(choice) if isinstance(choice, FunctionChoice) else choice or "auto",
            "tools": [{k: v for k, v in msgspec.to_builtins(t).items() if v is not None} for t in req.tools or []],
            "truncation": "disabled", "user": req.user, "metadata": req.metadata or {}, "service_tier": "default"}

    def body(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
             error: ApiError | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self.fixed, "status": status, "output": output, "usage": usage,
                "error": None if error is None else {"code": error.code or "server_error", "message": error.message},
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                **(extra or {})}


async def _complete(gw: Gateway, shape: Shape, turns: ChatTurns) -> web.StreamResponse:
    builder = OutputBuilder(shape.id)
    deltas = await drain(turns.deltas(), lambda why: gw.metrics.observe_failure(turns.gen.finish, why))
    if deltas is None:
        return web.Response(status=CLIENT_CLOSED)
    for delta in deltas:
        builder.feed(delta)
    reason, usage, extra = _finish(gw, shape, turns)
    builder.finish(reason != "length")
    return web.json_response(shape.body(_status(reason), builder.output(), usage, extra=_extra(builder, extra)))


async def _stream(gw: Gateway, request: web.Request, shape: Shape, turns: ChatTurns) -> web.StreamResponse:
    sse = ResponsesSse(request)
    builder = OutputBuilder(shape.id)

    async def send_events() -> None:
        started = shape.body("in_progress", [])
        await sse.send({"type": "response.created", "response": started})
        await sse.send({"type": "response.in_progress", "response": started})
        async with contextlib.aclosing(turns.deltas()) as deltas:
            async for delta in deltas:
                for event in builder.feed(delta):
                    await sse.send(event)
        try:
            reason, usage, extra = _finish(gw, shape, turns)
        except ApiError as e:
            for event in builder.finish(False):
                await sse.send(event)
            await sse.send({"type": "response.failed", "response": shape.body("failed", builder.output(), error=e)})
            return
        for event in builder.finish(reason != "length"):
            await sse.send(event)
        status = _status(reason)
        await sse.send({"type": f"response.{status}",
                        "response": shape.body(status, builder.output(), usage, extra=_extra(builder, extra))})

    return await stream(sse, send_events, lambda why: gw.metrics.observe_failure(turns.gen.finish, why), shape.id)


def _finish(gw: Gateway, shape: Shape, turns: ChatTurns) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """After the last delta: the chat finish reason, the Responses usage and specrelay's extra fields (server-side
    tool calls); metrics observed. A failed generation raises its ApiError."""
    [ended], usage = finish(gw, [turns])
    message, reason = ended.result, ended.finish
    extra = {"server_tool_calls": message["server_tool_calls"]} if message.get("server_tool_calls") else {}
    return reason, responses_usage(usage), extra


def _status(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


def _extra(builder: OutputBuilder, extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, "tool_call_errors": builder.errors} if builder.errors else extra


class ResponsesSse(SseWriter):
    """Responses streaming: `event: <type>` before each `data:`, a `sequence_number` in each event, no `[DONE]`."""

    def __init__(self, request: web.Request):
        super().__init__(request)
        self.sequence_number = 0

    async def send(self, event: Any) -> None:
        if "type" not in event and "error" in event:  # sse.stream's last word after an unexpected failure
            event = {**event["error"], "type": "error"}
        event = {**event, "sequence_number": self.sequence_number}
        self.sequence_number += 1
        await self._write(b"event: " + event["type"].encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n")

    async def done(self) -> web.StreamResponse:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.response.write_eof()
        return self.response
