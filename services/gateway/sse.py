"""Server-sent events as the OpenAI streaming API writes them: `data: <json>\\n\\n` per chunk, `data: [DONE]` last.

A write to a client that has gone away raises `ClientGone`, which the generation loop turns into a `Cancel` so the
verifier stops and frees the request's KV blocks.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_encoder = msgspec.json.Encoder()


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
