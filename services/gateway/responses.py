"""The OpenAI response objects: completions, streamed chunks, usage, finish reasons.

Usage mapping: the verifier's `Usage` Struct -> OpenAI's `usage`. The three fields OpenAI defines are renamed
(`cached_tokens` goes under `prompt_tokens_details`); every other field passes through under its own name
(`spec_steps`, `accepted_tokens`, ... and, when `Usage` gains them, `pte` objects and relay fields), so a new
field in `shared/messages.py` reaches clients without a gateway change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from specrelay.services.gateway.errors import ApiError
from specrelay.services.gateway.generation import Finish
from specrelay.services.gateway.logprobs import LogprobsView
from specrelay.shared.messages import TokenLogprob, Usage


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


def chat_completion(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
                    usage: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion`; `choices`: {index, message, logprobs, finish_reason} each."""
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage, "system_fingerprint": None}


def chat_chunk(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
               usage: dict[str, Any] | None = None, include_usage: bool = False) -> dict[str, Any]:
    """One `chat.completion.chunk` ({index, delta, logprobs, finish_reason} per choice); no choices: the
    usage-only chunk that closes a stream."""
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                             "model": model, "system_fingerprint": None, "choices": choices}
    if include_usage:
        chunk["usage"] = usage
    return chunk


def text_completion(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
                    usage: dict[str, Any] | None = None, include_usage: bool = True,
                    chunk: bool = False) -> dict[str, Any]:
    """A `text_completion` object ({index, text, logprobs, finish_reason} per choice); streamed chunks use the
    same object with a text delta."""
    body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                            "choices": choices, "system_fingerprint": None}
    if include_usage or not chunk:
        body["usage"] = usage
    return body


def now_s() -> int:
    return int(time.time())


@dataclass
class Ended:
    """One choice after its last delta: its whole message (chat) or text (completions), its finish reason, and the
    logprobs of every token it generated (none when not asked for)."""

    result: Any
    finish: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Shape:
    """How one endpoint writes its choices (streamer.py): whole, or as a stream of chunks. `logprobs`: set when
    the request asked for them."""

    request_id: str
    model: str
    created: int
    include_usage: bool  # streamed: every chunk has a usage field, and a usage-only chunk closes the stream
    logprobs: LogprobsView | None = None

    def opening(self, index: int) -> dict[str, Any] | None:
        """The chunk that opens a choice's stream, if the shape has one."""
        return None

    def chunk(self, index: int, delta: Any, logprobs: list[TokenLogprob],
              finish: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def body(self, choices: list[Ended], usage: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class ChatShape(Shape):
    """`chat.completion`, or `chat.completion.chunk`s of message deltas (each choice's first names the role)."""

    end_delta: dict[str, Any] = {}

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        return None if self.logprobs is None or entries is None else self.logprobs.chat(entries)

    def opening(self, index: int) -> dict[str, Any]:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def chunk(self, index: int, delta: dict[str, Any], logprobs: list[TokenLogprob],
              finish: str | None = None) -> dict[str, Any]:
        return self._chunk([{"index": index, "delta": delta, "logprobs": self._logprobs(logprobs or None),
                             "finish_reason": finish}])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return chat_chunk(self.request_id, self.model, self.created, [], usage, self.include_usage)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return chat_chunk(self.request_id, self.model, self.created, choices, None, self.include_usage)

    def body(self, choices: list[Ended], usage: dict[str, Any]) -> dict[str, Any]:
        return chat_completion(self.request_id, self.model, self.created, [
            {"index": i, "message": c.result, "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish}
            for i, c in enumerate(choices)], usage)


class CompletionShape(Shape):
    """`text_completion`, whole or as chunks of text deltas."""

    end_delta = ""

    def _logprobs(self, entries: list[TokenLogprob] | None, index: int) -> dict[str, Any] | None:
        return None if self.logprobs is None or entries is None else self.logprobs.completion(entries, index)

    def chunk(self, index: int, text: str, logprobs: list[TokenLogprob],
              finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": self._logprobs(logprobs or None, index),
                  "finish_reason": finish}
        return text_completion(self.request_id, self.model, self.created, [choice], None, self.include_usage,
                               chunk=True)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return text_completion(self.request_id, self.model, self.created, [], usage, self.include_usage, chunk=True)

    def body(self, choices: list[Ended], usage: dict[str, Any]) -> dict[str, Any]:
        return text_completion(self.request_id, self.model, self.created, [
            {"index": i, "text": c.result, "logprobs": self._logprobs(c.logprobs, i), "finish_reason": c.finish}
            for i, c in enumerate(choices)], usage)
