"""A streaming OpenAI chat-completions client that measures as it reads and never raises for a server's failure:
HTTP errors, broken streams and timeouts come back as a failed `ChatResult`, counted by the runner."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

from specrelay.loadgen.stream import ChatStreamAccumulator, SseDecoder, StreamError, usage_pte
from specrelay.shared.errors import SpecrelayError

MAX_ERROR_TEXT = 300


class EndpointError(SpecrelayError):
    """The endpoint cannot be reached or is not an OpenAI-compatible server."""


def api_base(endpoint: str) -> str:
    """`http://host:port`, `http://host:port/` and `http://host:port/v1` all mean the same API root."""
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EndpointError(f"endpoint {endpoint!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    slo_class: str
    deadline_ms: float | None = None  # time budget for this call, sent as X-Deadline-Ms
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class ChatResult:
    ok: bool
    error: str | None = None
    http_status: int | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    stream: ChatStreamAccumulator = field(default_factory=ChatStreamAccumulator)

    @property
    def usage(self) -> dict[str, Any]:
        return self.stream.usage or {}

    @property
    def completion_tokens(self) -> int:
        reported = self.usage.get("completion_tokens")
        return int(reported) if isinstance(reported, int) else len(self.stream.token_times)

    @property
    def tpot_ms(self) -> float | None:
        # vLLM benchmark_serving: TPOT = (E2E - TTFT) / (output tokens - 1), the mean time per token after the first.
        n = self.completion_tokens
        if self.ttft_ms is None or self.e2e_ms is None or n < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (n - 1)

    @property
    def pte(self) -> tuple[float | None, dict[str, float] | None]:
        return usage_pte(self.stream.usage)


def build_body(model: str, req: ChatRequest, *, slo_in_body: bool) -> dict[str, Any]:
    """The request body, OpenAI's `/v1/chat/completions` fields only unless `slo_in_body` adds the gateway's."""
    body: dict[str, Any] = {
        "model": model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.seed is not None:
        body["seed"] = req.seed
    if req.tools:
        body["tools"] = req.tools
        body["tool_choice"] = req.tool_choice or "auto"
    if slo_in_body:
        body["slo_class"] = req.slo_class
        if req.deadline_ms is not None:
            body["deadline_ms"] = int(req.deadline_ms)
    return body


def build_headers(req: ChatRequest, api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", "X-SLO-Class": req.slo_class}
    if req.deadline_ms is not None:
        headers["X-Deadline-Ms"] = str(int(req.deadline_ms))
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class OpenAIClient:
    def __init__(self, session: aiohttp.ClientSession, endpoint: str, model: str, *, api_key: str | None = None,
                 slo_in_body: bool = False, request_timeout_s: float = 300.0):
        self.session = session
        self.url = api_base(endpoint) + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.slo_in_body = slo_in_body
        self.request_timeout_s = request_timeout_s

    async def chat(self, req: ChatRequest) -> ChatResult:
        result = ChatResult(ok=False)
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._stream(req, result, t0), self.request_timeout_s)
        except asyncio.TimeoutError:
            result.error = f"timeout after {self.request_timeout_s:g}s"
        except aiohttp.ClientConnectorError as e:
            result.error = f"connection failed: {e}"
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            result.error = f"stream broken: {type(e).__name__}: {e}"
        except aiohttp.ClientError as e:
            result.error = f"{type(e).__name__}: {e}"
        except StreamError as e:
            result.error = f"stream error: {e}"
        except ValueError as e:  # aiohttp: an SSE line longer than the read buffer
            result.error = f"stream broken: {e}"
        result.e2e_ms = (time.perf_counter() - t0) * 1000.0
        times = result.stream.token_times
        if times:
            result.ttft_ms = (times[0] - t0) * 1000.0
            result.itl_ms = [(b - a) * 1000.0 for a, b in zip(times, times[1:])]
        if result.ok and result.stream.finish_reason is None:
            result.ok, result.error = False, "stream ended without a finish_reason"
        return result

    async def _stream(self, req: ChatRequest, result: ChatResult, t0: float) -> None:
        body = build_body(self.model, req, slo_in_body=self.slo_in_body)
        async with self.session.post(self.url, json=body, headers=build_headers(req, self.api_key)) as resp:
            result.http_status = resp.status
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {error_text(await resp.text(errors='replace'))}"
                return
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                result.error = f"not a stream (Content-Type {resp.headers.get('Content-Type')!r})"
                return
            decoder, acc = SseDecoder(), result.stream
            async for line in resp.content:
                for payload in decoder.feed(line):
                    acc.feed_payload(payload, time.perf_counter())
            for payload in decoder.flush():
                acc.feed_payload(payload, time.perf_counter())
        # OpenAI, vLLM and SGLang all end with [DONE]; a stream cut before it lost the tail of the response.
        result.ok = acc.done
        if not acc.done:
            result.error = "stream closed before [DONE]"


def error_text(body: str) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:MAX_ERROR_TEXT]
    except (ValueError, AttributeError):
        pass
    return body.strip()[:MAX_ERROR_TEXT] or "(empty body)"


async def discover_model(session: aiohttp.ClientSession, endpoint: str, api_key: str | None = None,
                         timeout_s: float = 10.0) -> list[str]:
    """GET /v1/models: proves the endpoint is up and speaks the OpenAI API, and names its models."""
    url = api_base(endpoint) + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def fetch() -> tuple[int, str]:
        async with session.get(url, headers=headers) as resp:
            return resp.status, await resp.text(errors="replace")

    try:
        status, text = await asyncio.wait_for(fetch(), timeout_s)
    except asyncio.TimeoutError:
        raise EndpointError(f"{url}: no answer in {timeout_s:g}s") from None
    except aiohttp.ClientError as e:
        raise EndpointError(f"cannot reach {url}: {e}") from None
    if status != 200:
        raise EndpointError(f"{url} answered HTTP {status}: {error_text(text)} (is it an OpenAI-compatible server?)")
    try:
        models = [m["id"] for m in json.loads(text)["data"]]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"{url} did not return an OpenAI model list: {text[:120]!r}") from None
    if not models:
        raise EndpointError(f"{url} serves no models")
    return models
