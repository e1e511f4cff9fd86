"""One response path for chat and text completions, parameterised by the response's shape.

A `Choice` is what the request generates: `ChatTurns` (tool_rounds.py: message deltas, tool calls, tool rounds)
or a `TextChoice` (a completion's text). A `Shape` (responses.py) is how OpenAI writes it: `chat.completion` and
its chunks, or `text_completion`. `respond` either drains the choice into one JSON body or streams it as SSE:
an opening chunk (chat's role), a chunk per delta, the finish reason, then, if asked for, the usage chunk. A
generation that failed after a stream began ends it with an error event (the status line is gone); before, the
error middleware answers with the error's status.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Protocol

from aiohttp import web

from specrelay.services.gateway import responses as R
from specrelay.services.gateway.errors import ApiError
from specrelay.services.gateway.exchange import Exchange
from specrelay.services.gateway.generation import Generation
from specrelay.services.gateway.sse import SseWriter, drain, stream
from specrelay.services.gateway.state import Gateway

CLIENT_CLOSED = 499  # nginx's "client closed request": only ever seen in logs and metrics


class Choice(Protocol):
    gen: Generation  # the last generation: its finish says how the choice ended
    has_client_calls: bool  # after the deltas: the finish reason is "tool_calls"

    def deltas(self) -> AsyncIterator[Any]: ...  # what each streamed chunk carries

    def result(self) -> Any: ...  # after the deltas: the whole message or text

    def openai_usage(self) -> dict[str, Any]: ...


class TextChoice:
    """A text completion: the generation's text deltas, joined for the non-streamed body."""

    has_client_calls = False

    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.gen = exchange.generation()
        self._parts: list[str] = []

    async def deltas(self) -> AsyncIterator[str]:
        async with contextlib.aclosing(self.exchange.events(self.gen)) as events:
            async for text in events:
                self._parts.append(text)
                yield text

    def result(self) -> str:
        return "".join(self._parts)

    def openai_usage(self) -> dict[str, Any]:
        return R.usage_to_openai(self.gen.finish.usage, len(self.exchange.prep.generate.prompt_token_ids),
                                 self.gen.finish)


async def respond(gw: Gateway, request: web.Request, shape: R.Shape, choice: Choice,
                  streamed: bool) -> web.StreamResponse:
    if streamed:
        return await _stream(gw, request, shape, choice)
    return await _complete(gw, shape, choice)


def finish(gw: Gateway, choice: Choice) -> tuple[Any, str, dict[str, Any]]:
    """After the last delta: (the choice's result, OpenAI's finish reason, usage); metrics observed. A failed
    generation raises its ApiError (observed as a failure)."""
    try:
        result = choice.result()
        reason = R.finish_reason(choice.gen.finish, choice.has_client_calls)
    except ApiError:
        gw.metrics.observe_failure(choice.gen.finish, "error")
        raise
    usage = choice.openai_usage()
    gw.metrics.observe(choice.gen.timing, reason, usage)
    return result, reason, usage


async def _complete(gw: Gateway, shape: R.Shape, choice: Choice) -> web.StreamResponse:
    if await drain(choice.deltas(), lambda why: gw.metrics.observe_failure(choice.gen.finish, why)) is None:
        return web.Response(status=CLIENT_CLOSED)
    result, reason, usage = finish(gw, choice)
    return web.json_response(shape.body(result, reason, usage))


async def _stream(gw: Gateway, request: web.Request, shape: R.Shape, choice: Choice) -> web.StreamResponse:
    sse = SseWriter(request)

    async def send_events() -> None:
        await sse.start()
        if (opening := shape.opening()) is not None:
            await sse.send(opening)
        async with contextlib.aclosing(choice.deltas()) as deltas:
            async for delta in deltas:
                await sse.send(shape.chunk(delta))
        try:
            _, reason, usage = finish(gw, choice)
        except ApiError as e:
            await sse.send(e.body())
            return
        await sse.send(shape.chunk(shape.end_delta, reason))
        if shape.include_usage:
            await sse.send(shape.usage_chunk(usage))

    return await stream(sse, send_events, lambda why: gw.metrics.observe_failure(choice.gen.finish, why),
                        shape.request_id)
