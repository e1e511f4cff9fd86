"""One streamed `/v1/completions` request as `specrelay chaos` sends it, and what came back: every text chunk in
order (a re-sent chunk must stay visible, so nothing is merged), the finish reason, the HTTP status, and whether
it ended by itself or by our timeout (a hang). Never raises for the server's failures: they are the measurement."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from specrelay.loadgen.client import error_text
from specrelay.loadgen.stream import DONE, SseDecoder


@dataclass
class Outcome:
    label: str  # which prompt (its reference) and what kind of request: "p3", "long0", "poison:seed=2**70"
    status: int | None = None
    chunks: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    timed_out: bool = False  # still open when our timeout fired: a hang
    started_s: float = 0.0
    ended_s: float = 0.0
    done: bool = False  # the stream ended with [DONE]

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.finish_reason is not None and self.error is None

    @property
    def refused(self) -> bool:
        """Turned away with a 4xx: the answer to a bad request, not a failure of the server."""
        return self.status is not None and 400 <= self.status < 500

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def duration_s(self) -> float:
        return self.ended_s - self.started_s

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "status": self.status, "ok": self.ok, "refused": self.refused,
                "timed_out": self.timed_out, "finish_reason": self.finish_reason,
                "completion_tokens": self.completion_tokens, "error": self.error,
                "duration_s": round(self.duration_s, 3), "num_chunks": len(self.chunks)}


def completion_body(model: str, prompt_ids: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """Token ids as the prompt: the reference decodes exactly these, whatever the tokenizer would make of text."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update(extra)
    return body


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict[str, Any] | bytes, timeout_s: float,
                            out: Outcome) -> Outcome:
    """Fills `out` as the stream arrives (a watcher sees the chunks so far) and returns it once it has ended."""
    out.started_s = time.monotonic()
    try:
        await asyncio.wait_for(_read(session, url, body, out), timeout_s)
    except asyncio.TimeoutError:
        out.timed_out, out.error = True, f"no end after {timeout_s:g}s"
    except aiohttp.ClientError as e:
        out.error = f"{type(e).__name__}: {e}"
    except ValueError as e:  # not JSON in the stream, or a line longer than aiohttp's buffer
        out.error = f"broken stream: {e}"
    out.ended_s = time.monotonic()
    if out.error is None and out.status == 200 and not out.done:
        out.error = "stream closed before [DONE]"
    return out


async def _read(session: aiohttp.ClientSession, url: str, body: dict[str, Any] | bytes, out: Outcome) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}/v1/completions", data=data,
                            headers={"Content-Type": "application/json", "Accept": "text/event-stream"}) as resp:
        out.status = resp.status
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {error_text(await resp.text(errors='replace'))}"
            return
        decoder = SseDecoder()
        async for line in resp.content:
            for payload in decoder.feed(line):
                _event(payload, out)
        for payload in decoder.flush():
            _event(payload, out)


def _event(payload: str, out: Outcome) -> None:
    if payload.strip() == DONE:
        out.done = True
        return
    chunk = json.loads(payload)
    if not isinstance(chunk, dict):
        raise ValueError(f"not a chunk: {payload[:80]!r}")
    if chunk.get("error"):
        err = chunk["error"]
        out.error = f"error in the stream: {err.get('message', err) if isinstance(err, dict) else err}"
        return
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        out.completion_tokens = usage["completion_tokens"]
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            out.chunks.append(choice["text"])
        if choice.get("finish_reason"):
            out.finish_reason = choice["finish_reason"]
