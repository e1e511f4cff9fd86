"""Parsing an OpenAI chat-completions stream: server-sent events, then `chat.completion.chunk` deltas.

The wire format (OpenAI API reference, "The chat completion chunk object"): each event is `data: <json chunk>`
followed by a blank line, and the stream ends with `data: [DONE]`. A chunk has `choices[i].delta` with `role`,
`content` and `tool_calls` fragments; a tool call arrives as fragments sharing an `index`, the first carrying `id`,
`type` and `function.name`, the rest appending to `function.arguments`. With `stream_options.include_usage`, a last
chunk has `choices: []` and `usage`. Servers that think aloud (vLLM, SGLang) stream `reasoning_content`; it counts
as tokens for timing. An error mid-stream arrives as a chunk with an `error` object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

DONE = "[DONE]"


class SseDecoder:
    """Line-fed decoder of the event-stream format (WHATWG HTML, "Server-sent events"): `data:` lines accumulate
    (joined by newlines), a blank line dispatches the event, `:` starts a comment, other fields are ignored."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: bytes | str) -> Iterator[str]:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        text = text.rstrip("\r\n")
        if text == "":
            if self._data:
                payload = "\n".join(self._data)
                self._data = []
                yield payload
            return
        if text.startswith(":"):
            return
        name, _, value = text.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)

    def flush(self) -> Iterator[str]:
        """An event not followed by a blank line when the connection closed."""
        if self._data:
            payload = "\n".join(self._data)
            self._data = []
            yield payload


@dataclass
class ToolCallDelta:
    id: str = ""
    type: str = "function"
    name: str = ""
    arguments: str = ""

    def as_message(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


class StreamError(Exception):
    """The server reported an error inside the stream, or sent something that is not a chunk."""


@dataclass
class ChatStreamAccumulator:
    """Folds chunks of choice 0 into the final message, and notes when tokens arrived (for TTFT and ITL)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: dict[int, ToolCallDelta] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    token_times: list[float] = field(default_factory=list)  # monotonic seconds of chunks that carried tokens
    num_chunks: int = 0
    done: bool = False

    def feed_payload(self, payload: str, t: float) -> None:
        if payload.strip() == DONE:
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise StreamError(f"not JSON in the stream: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"not a chunk object: {payload[:80]!r}")
        self.feed_chunk(chunk, t)

    def feed_chunk(self, chunk: dict[str, Any], t: float) -> None:
        if chunk.get("error"):
            err = chunk["error"]
            raise StreamError(str(err.get("message", err)) if isinstance(err, dict) else str(err))
        self.num_chunks += 1
        self.model = chunk.get("model", self.model)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        carried = False
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # the loadgen asks for n=1
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content += delta["content"]
                carried = True
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if thought:
                self.reasoning += thought
                carried = True
            for frag in delta.get("tool_calls") or []:
                call = self.tool_calls.setdefault(int(frag.get("index", 0)), ToolCallDelta())
                call.id = frag.get("id") or call.id
                call.type = frag.get("type") or call.type
                fn = frag.get("function") or {}
                call.name += fn.get("name") or ""
                call.arguments += fn.get("arguments") or ""
                carried = True
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if carried:
            self.token_times.append(t)

    def assistant_message(self) -> dict[str, Any]:
        """The message to append to the conversation before the next turn (OpenAI's assistant message shape)."""
        if not self.tool_calls:
            return {"role": "assistant", "content": self.content}
        # With tool calls, an empty content is null in OpenAI's own responses.
        return {"role": "assistant", "content": self.content or None,
                "tool_calls": [self.tool_calls[i].as_message() for i in sorted(self.tool_calls)]}


def usage_pte(usage: dict[str, Any] | None) -> tuple[float | None, dict[str, float] | None]:
    """`usage.pte` is a number or an object with `total` (and breakdown fields); anything else is ignored."""
    if not usage or "pte" not in usage:
        return None, None
    pte = usage["pte"]
    if isinstance(pte, bool):
        return None, None
    if isinstance(pte, (int, float)):
        return float(pte), None
    if isinstance(pte, dict) and isinstance(pte.get("total"), (int, float)):
        detail = {k: float(v) for k, v in pte.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return float(pte["total"]), detail
    return None, None
