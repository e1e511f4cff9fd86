"""One response path for chat and text completions, parameterised by the response's shape.

A `Choice` is what the request generates: `ChatTurns` (tool_rounds.py: message deltas, tool calls, tool rounds)
or a `TextChoice` (a completion's text). A `Shape` (responses.py) is how OpenAI writes it: `chat.completion` and
its chunks, or `text_completion`. `respond` either drains the choice into one JSON body or streams it as SSE:
an opening chunk (chat's role), a chunk per delta, the finish reason, then, if asked for, the usage chunk. A
generation that failed after a stream began ends it with an error event (the status line is gone); before, the
error middleware answers with the error's status.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Protocol

from aiohttp import web

from specrelay.services.gateway import responses as R
from specrelay.services.gateway.errors import ApiError
from specrelay.services.gateway.exchange import Exchange
from specrelay.services.gateway.generation import Generation
from specrelay.services.gateway.sse import SseWriter, drain, stream
from specrelay.services.gateway.state import Gateway
from specrelay.shared.messages import TokenLogprob

CLIENT_CLOSED = 499  # nginx's "client closed request": only ever seen in logs and metrics


class Choice(Protocol):
    gen: Generation  # the last generation: its finish says how the choice ended
    has_client_calls: bool  # after the deltas: the finish reason is "tool_calls"

    def deltas(self) -> AsyncIterator[Any]: ...  # what each streamed chunk carries

    def result(self) -> Any: ...  # after the deltas: the whole message or text

    def openai_usage(self) -> dict[str, Any]: ...

    def take_logprobs(self) -> list[TokenLogprob]: ...  # of the tokens since the last call ([] if not asked for)


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

    def take_logprobs(self) -> list[TokenLogprob]:
        return self.gen.take_logprobs()


async def respond(gw: Gateway, request: web.Request, shape: R.Shape, choices: list[Choice],
                  streamed: bool) -> web.StreamResponse:
    """`choices`: the request's `n` choices, generated side by side."""
    if streamed:
        return await _stream(gw, request, shape, choices)
    return await _complete(gw, shape, choices)


def finish(gw: Gateway, choices: list[Choice]) -> tuple[list[R.Ended], dict[str, Any]]:
    """After the last delta: each choice's result and OpenAI's finish reason (with the logprobs not yet taken, if
    asked for), and the usage of them all (summed_usage); metrics observed once for the request. A failed
    generation raises its ApiError (observed as a failure)."""
    ended = []
    for choice in choices:
        try:
            result = choice.result()
            reason = R.finish_reason(choice.gen.finish, choice.has_client_calls)
        except ApiError:
            gw.metrics.observe_failure(choice.gen.finish, "error")
            raise
        ended.append(R.Ended(result, reason, choice.take_logprobs()))
    usage = summed_usage([choice.openai_usage() for choice in choices])
    gw.metrics.observe(choices[0].gen.timing, ended[0].finish, usage)
    return ended, usage


# Fields of a usage that describe the verifier, not the work done: the same for every choice, never summed.
NOT_SUMMED = ("prompt_tokens", "prompt_tokens_details", "gamma", "beta", "source")


def summed_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The usage of `n` generations of one prompt: the prompt (and its cached part) once, as OpenAI counts it;
    every count summed over the choices (usage.pte's profile parameters kept). The cached part is the least any
    choice had: a choice that copied the prompt's KV from another (the verifier prefills it once) counts it as
    cached, but the prompt was computed once all the same."""
    out = usages[0]
    for usage in usages[1:]:
        out = _add(out, usage)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages if u.get("prompt_tokens_details")]
    if cached and len(cached) == len(usages):
        out = {**out, "prompt_tokens_details": {**out["prompt_tokens_details"], "cached_tokens": min(cached)}}
    return {**out, "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: a.get(k) if k in NOT_SUMMED and k in a else _add(a.get(k), b.get(k)) for k in {**a, **b}}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a + b
    return a if a is not None else b


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[int, Any, list[TokenLogprob]]]:
    """(choice index, delta, the logprobs of the tokens behind it) from every choice as each comes. One choice is
    read directly; several through a task each, cancelled (and so their generations) when the reader stops early."""
    if len(choices) == 1:
        async with contextlib.aclosing(choices[0].deltas()) as deltas:
            async for delta in deltas:
                yield 0, delta, choices[0].take_logprobs()
        return
    queue: asyncio.Queue[tuple[int, Any, list[TokenLogprob], BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(index: int, choice: Choice) -> None:
        try:
            async with contextlib.aclosing(choice.deltas()) as deltas:
                async for delta in deltas:
                    await queue.put((index, delta, choice.take_logprobs(), None))
            await queue.put((index, done, [], None))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((index, done, [], e))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            index, delta, logprobs, error = await queue.get()
            if error is not None:
                raise error
            if delta is done:
                running -= 1
            else:
                yield index, delta, logprobs
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _complete(gw: Gateway, shape: R.Shape, choices: list[Choice]) -> web.StreamResponse:
    items = await drain(merged(choices), lambda why: _failed(gw, choices, why))
    if items is None:
        return web.Response(status=CLIENT_CLOSED)
    ended, usage = finish(gw, choices)
    for index, choice in enumerate(ended):  # what the deltas carried, then the tail finish took
        choice.logprobs = [lp for i, _, logprobs in items if i == index for lp in logprobs] + choice.logprobs
    return web.json_response(shape.body(ended, usage))


async def _stream(gw: Gateway, request: web.Request, shape: R.Shape,
                  choices: list[Choice]) -> web.StreamResponse:
    sse = SseWriter(request)

    async def send_events() -> None:
        await sse.start()
        for index in range(len(choices)):
            if (opening := shape.opening(index)) is not None:
                await sse.send(opening)
        async with contextlib.aclosing(merged(choices)) as deltas:
            async for index, delta, logprobs in deltas:
                await sse.send(shape.chunk(index, delta, logprobs))
        try:
            ended, usage = finish(gw, choices)
        except ApiError as e:
            await sse.send(e.body())
            return
        for index, choice in enumerate(ended):
            await sse.send(shape.chunk(index, shape.end_delta, choice.logprobs or [], choice.finish))
        if shape.include_usage:
            await sse.send(shape.usage_chunk(usage))

    return await stream(sse, send_events, lambda why: _failed(gw, choices, why), shape.request_id)


def _failed(gw: Gateway, choices: list[Choice], why: str) -> None:
    gw.metrics.observe_failure(choices[0].gen.finish, why)
