"""Responses API output: chat deltas -> output items and the streaming events that build them.

One `OutputBuilder` serves both modes: a streamed response sends the events `feed` and `finish` return; a plain one
drops them and keeps `output()`. Either way the items, their ids and their text are the same.

Events, as OpenAI sends them for one reply (output_index: the item's place in `output`):

    response.created, response.in_progress
    text:  output_item.added(message) content_part.added output_text.delta* output_text.done content_part.done
           output_item.done
    call:  output_item.added(function_call) function_call_arguments.delta* function_call_arguments.done
           output_item.done
    response.completed | response.incomplete (max_output_tokens) | response.failed (with `error`)

Whitespace between items (the newline before a `<tool_call>`) opens no message item. A call the parser refuses after
its first piece was sent (`tool_call_errors` with an index) ends `incomplete` and is left out of the final `output`,
so a client never runs a malformed call; the errors themselves are listed under `tool_call_errors`.
"""

from __future__ import annotations

from typing import Any

Event = dict[str, Any]


class OutputBuilder:
    def __init__(self, response_id: str):
        self.response_id = response_id
        self.items: list[dict[str, Any]] = []
        self.open: int | None = None  # output index of the item still being written
        self.calls: dict[int, int] = {}  # chat tool-call index -> output index
        self.dropped: set[int] = set()  # output indexes of calls refused after they began
        self.errors: list[dict[str, Any]] = []
        self.pending = ""  # whitespace not shown yet: it opens a message only if text follows

    def feed(self, delta: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        if delta.get("content"):
            events += self._text(delta["content"])
        for piece in delta.get("tool_calls", ()):
            events += self._call(piece)
        for error in delta.get("tool_call_errors", ()):
            self.errors.append({k: v for k, v in error.items() if k != "index"})
            if "index" in error and error["index"] in self.calls:
                events += self._drop(self.calls[error["index"]])
        return events

    def finish(self, complete: bool) -> list[Event]:
        """Close the item still open (`complete`: the reply ended by itself, not at max_output_tokens)."""
        if not self.items:  # a reply of nothing (or only whitespace) is still one message
            return self._open_message(self.pending) + self._close(complete)
        return self._close(complete)

    def output(self) -> list[dict[str, Any]]:
        return [item for i, item in enumerate(self.items) if i not in self.dropped]

    # --- items ---

    def _text(self, text: str) -> list[Event]:
        item = self.items[self.open] if self.open is not None else None
        if item is not None and item["type"] == "message":
            return self._text_delta(text)
        if not (self.pending + text).strip():
            self.pending += text
            return []
        text, self.pending = self.pending + text, ""
        return self._close(True) + self._open_message(text)

    def _open_message(self, text: str) -> list[Event]:
        index = len(self.items)
        item = {"id": f"msg_{self.response_id}_{index}", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        self.items.append(item)
        self.open = index
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [{"type": "response.output_item.added", "output_index": index, "item": _copy(item)}]
        item["content"].append(part)
        events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                       "content_index": 0, "part": dict(part)})
        return events + (self._text_delta(text) if text else [])

    def _text_delta(self, text: str) -> list[Event]:
        item = self.items[self.open]
        item["content"][0]["text"] += text
        return [{"type": "response.output_text.delta", "item_id": item["id"], "output_index": self.open,
                 "content_index": 0, "delta": text, "logprobs": []}]

    def _call(self, piece: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        function = piece.get("function", {})
        if piece["index"] not in self.calls:  # a call's first piece carries its id and name
            events += self._close(True)
            self.pending = ""
            index = len(self.items)
            item = {"id": f"fc_{piece['id']}", "type": "function_call", "call_id": piece["id"],
                    "name": function["name"], "arguments": "", "status": "in_progress"}
            self.items.append(item)
            self.calls[piece["index"]], self.open = index, index
            events.append({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
        index = self.calls[piece["index"]]
        if arguments := function.get("arguments"):
            item = self.items[index]
            item["arguments"] += arguments
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": index, "delta": arguments})
        return events

    def _drop(self, index: int) -> list[Event]:
        self.dropped.add(index)
        item = self.items[index]
        item["status"] = "incomplete"
        if self.open == index:
            self.open = None
        return [{"type": "response.output_item.done", "output_index": index, "item": dict(item)}]

    def _close(self, complete: bool) -> list[Event]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        item = self.items[index]
        item["status"] = "completed" if complete else "incomplete"
        events: list[Event] = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [{"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "text": part["text"], "logprobs": []},
                       {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": dict(part)}]
        else:
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "name": item["name"], "arguments": item["arguments"]})
        events.append({"type": "response.output_item.done", "output_index": index, "item": _copy(item)})
        return events


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "content": [dict(p) for p in item["content"]]} if "content" in item else dict(item)


def responses_usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage -> Responses usage (input/output tokens); specrelay's extra fields pass through."""
    extra = dict(chat_usage)
    prompt, completion = extra.pop("prompt_tokens"), extra.pop("completion_tokens")
    total, details = extra.pop("total_tokens"), extra.pop("prompt_tokens_details")
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": details["cached_tokens"]},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": total,
            **extra}
