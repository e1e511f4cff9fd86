"""Server-sent events as the OpenAI streaming API writes them: `data: <json>\\n\\n` per chunk, `data: [DONE]` last.

A write to a client that has gone away raises `ClientGone`, which the generation loop turns into a `Cancel` so the
verifier stops and frees the request's KV blocks. `stream` and `drain` end a response however it ends (the client
left, the handler was cancelled, an unexpected error mid-stream), so a handler states only what it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import msgspec
from aiohttp import web

from specrelay.services.gateway.errors import ApiError

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()

T = TypeVar("T")
Ended = Callable[[str], None]  # told why a response ended early: "client_gone" | "error"


class ClientGone(Exception):
    """The HTTP client closed the connection."""


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class SseWriter:
    def __init__(self, request: web.Request):
        self._request = request
        self._response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.started = False

    async def start(self) -> None:
        if not self.started:
            await self._response.prepare(self._request)
            self.started = True

    async def send(self, event: Any) -> None:
        await self._write(b"data: " + _encoder.encode(event) + b"\n\n")

    async def done(self) -> web.StreamResponse:
        await self._write(b"data: [DONE]\n\n")
        try:
            await self._response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return self._response

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    async def _write(self, data: bytes) -> None:
        await self.start()
        if client_gone(self._request):
            raise ClientGone()
        try:
            await self._response.write(data)
        except (ConnectionError, RuntimeError) as e:  # aiohttp: ClientConnectionResetError / "cannot write"
            raise ClientGone() from e


@contextlib.contextmanager
def _departure(ended: Ended) -> Iterator[None]:
    try:
        yield
    except (ClientGone, asyncio.CancelledError):  # aiohttp cancels the handler of a client that went away
        ended("client_gone")
        raise


async def drain(events: AsyncIterator[T], ended: Ended) -> list[T] | None:
    """Every item of `events` (a non-streamed response), or None when the client went away."""
    try:
        with _departure(ended):
            async with contextlib.aclosing(events) as items:
                return [item async for item in items]
    except ClientGone:
        return None


async def stream(sse: SseWriter, send_events: Callable[[], Awaitable[None]], ended: Ended,
                 request_id: str) -> web.StreamResponse:
    """`send_events()` writes a response's events to `sse`; `[DONE]` follows. An unexpected error after the stream
    began ends it with an error event instead: the status line is gone (before, the error middleware answers 500)."""
    try:
        with _departure(ended):
            await send_events()
            return await sse.done()
    except ClientGone:
        return sse.response
    except Exception:
        if not sse.started:
            raise
        log.exception("gateway: stream %s failed", request_id)
        ended("error")
        with contextlib.suppress(ClientGone):
            await sse.send(ApiError(500, "internal server error", code="internal_error").body())
            return await sse.done()
        return sse.response
