"""The OpenAI response objects: completions, streamed chunks, usage, finish reasons.

Usage mapping: the verifier's `Usage` Struct -> OpenAI's `usage`. The three fields OpenAI defines are renamed
(`cached_tokens` goes under `prompt_tokens_details`); every other field passes through under its own name
(`spec_steps`, `accepted_tokens`, ... and, when `Usage` gains them, `pte` objects and relay fields), so a new
field in `shared/messages.py` reaches clients without a gateway change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from specrelay.services.gateway.errors import ApiError
from specrelay.services.gateway.generation import Finish
from specrelay.shared.messages import Usage


def usage_to_openai(usage: Usage | None, num_prompt_tokens: int, finish: Finish) -> dict[str, Any]:
    extra: dict[str, Any] = msgspec.to_builtins(usage) if usage is not None else {}
    prompt = extra.pop("prompt_tokens", 0) or num_prompt_tokens
    reported = extra.pop("completion_tokens", 0)
    # After a stop string the verifier may have run a step past it; the client is billed for what it was shown.
    completion = finish.num_tokens if finish.stop_string or not reported else reported
    cached = extra.pop("cached_tokens", 0)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}
    out.update((k, v) for k, v in extra.items() if v is not None)  # usage.relay / usage.pte only when measured
    return out


def finish_reason(finish: Finish, has_tool_calls: bool) -> str:
    """The OpenAI finish_reason; a verifier failure becomes an ApiError instead."""
    if finish.reason == "error":
        raise ApiError(500, f"generation failed: {finish.error}", code="generation_error")
    if finish.reason == "timeout":
        raise ApiError(504, f"generation timed out: {finish.error}", code="timeout")
    if finish.reason == "cancelled":  # not ours: the verifier gave the request up (e.g. shutting down)
        raise ApiError(503, "the verifier cancelled the request", code="cancelled")
    if finish.reason == "length":  # before calls: the turn was cut (a call it ended inside is left out of them)
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def chat_completion(request_id: str, model: str, created: int, message: dict[str, Any], finish: str,
                    usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage, "system_fingerprint": None}


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, Any] | None, finish: str | None = None,
               usage: dict[str, Any] | None = None, include_usage: bool = False) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk that closes a stream (no choices)."""
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                             "model": model, "system_fingerprint": None,
                             "choices": [] if delta is None else
                             [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        chunk["usage"] = usage
    return chunk


def text_completion(request_id: str, model: str, created: int, text: str, finish: str | None,
                    usage: dict[str, Any] | None = None, include_usage: bool = True,
                    chunk: bool = False) -> dict[str, Any]:
    """A `text_completion` object; streamed chunks use the same object with a text delta."""
    body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [] if text is None else
                            [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                            "system_fingerprint": None}
    if include_usage or not chunk:
        body["usage"] = usage
    return body


def now_s() -> int:
    return int(time.time())


class Shape(Protocol):
    """How one endpoint writes a choice (streamer.py): whole, or as a stream of chunks."""

    request_id: str
    include_usage: bool  # streamed: every chunk has a usage field, and a usage-only chunk closes the stream
    end_delta: Any  # the delta of the chunk that carries the finish reason

    def opening(self) -> dict[str, Any] | None: ...

    def chunk(self, delta: Any, finish: str | None = None) -> dict[str, Any]: ...

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]: ...

    def body(self, result: Any, finish: str, usage: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ChatShape:
    """`chat.completion`, or `chat.completion.chunk`s of message deltas (the first names the role)."""

    request_id: str
    model: str
    created: int
    include_usage: bool
    end_delta: Any = field(default_factory=dict)

    def opening(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        return chat_chunk(self.request_id, self.model, self.created, delta, finish, None, self.include_usage)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return chat_chunk(self.request_id, self.model, self.created, None, None, usage, self.include_usage)

    def body(self, message: dict[str, Any], finish: str, usage: dict[str, Any]) -> dict[str, Any]:
        return chat_completion(self.request_id, self.model, self.created, message, finish, usage)


@dataclass(frozen=True)
class CompletionShape:
    """`text_completion`, whole or as chunks of text deltas."""

    request_id: str
    model: str
    created: int
    include_usage: bool
    end_delta: Any = ""

    def opening(self) -> None:
        return None

    def chunk(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        return text_completion(self.request_id, self.model, self.created, text, finish, None, self.include_usage,
                               chunk=True)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return text_completion(self.request_id, self.model, self.created, None, None, usage, self.include_usage,
                               chunk=True)

    def body(self, text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
        return text_completion(self.request_id, self.model, self.created, text, finish, usage)
