"""Tool calls out of generated text, streamed or not, in the chat template's format.

Formats (decided for specrelay):
  * hermes (Hermes / Qwen2.5): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, several in a row,
    possibly after some text. `<tool_call>` markup never reaches the content.
  * llama3: the whole assistant text is a JSON object `{"name": ..., "parameters": {...}}` (or "arguments"),
    optionally after `<|python_tag|>`; several objects may be separated by `;`.
  * auto: llama3 when the text opens with `{` or `<|python_tag|>`, hermes otherwise.

Streaming: `feed(text_delta)` returns what can be shown now. Content is held back only while it might be the start
of `<tool_call>`, or is whitespace that may precede one. Inside a hermes call, once `{"name": "...", "arguments": {`
has arrived the call's first delta (index, id, name) goes out and the argument text follows as it arrives, less
the tail that might be the object's closing brace. Such a name-first object must end with its arguments (no keys
after them), so that a streamed call is never contradicted by its end; other key orders and double-encoded
arguments are accepted whole when the block closes. A llama3 reply is one JSON object, so it is held to the end.
`parse_tool_calls` is the same machine fed the whole text, so streamed and whole parses agree.

Content whitespace: leading whitespace of the reply and of any text after a call is dropped, and whitespace at the
end of the reply (typically the newline before `<tool_call>`) is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Collection

from specrelay.services.toolcoord.toolcalls import (
    IdFactory,
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallError,
    call_from_object,
    new_tool_call_id,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
FORMATS = ("hermes", "llama3", "auto")

# The head of a hermes call object, written name-first as the chat template does.
_HERMES_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')
_LOOKS_LIKE_LLAMA_CALL = re.compile(r'\s*\{\s*"name"\s*:')


def _held_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may yet become one)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class StreamingToolParser:
    """Turns generated text deltas into OpenAI content and `tool_calls` deltas. One instance per choice."""

    def __init__(self, fmt: str = "hermes", tool_names: Collection[str] | None = None,
                 id_factory: IdFactory = new_tool_call_id) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {FORMATS}")
        self.fmt = fmt
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self._new_id = id_factory
        self.result = ParsedOutput()
        # "detect" until the first visible characters say which format; then "content", "call" (inside a hermes
        # block) or "whole" (a llama3 reply, held to the end).
        self._state = "detect" if fmt in ("llama3", "auto") else "content"
        self._pending = ""  # text not yet assigned in the current state
        self._segment_start = True  # the next content starts the reply or follows a call: drop leading whitespace
        self._held_ws = ""  # trailing whitespace of content, shown only when more content follows
        self._next_index = 0
        # The hermes call being streamed: its index/id/name once the header is out, argument text sent so far.
        self._call_index: int | None = None
        self._call_id = ""
        self._call_name = ""
        self._args_start = 0
        self._args_sent = ""
        self._finished = False

    # --- public ---------------------------------------------------------------------------------------------------
    def feed(self, text: str) -> StreamDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        out = StreamDelta()
        self._pending += text
        self._advance(out, final=False)
        return out

    def finish(self) -> StreamDelta:
        """Flush at the end of generation; afterwards `result` holds the whole parsed message."""
        out = StreamDelta()
        if not self._finished:
            self._advance(out, final=True)
            self._finished = True
        return out

    # --- state machine --------------------------------------------------------------------------------------------
    def _advance(self, out: StreamDelta, final: bool) -> None:
        while True:
            if self._state == "detect" and not self._detect(final):
                return
            if self._state == "whole":
                if final and self._finish_whole(out):
                    continue  # not a llama3 call after all: the text goes through the content path
                return
            if self._state == "content":
                if not self._advance_content(out, final):
                    return
            elif self._state == "call":
                if not self._advance_call(out, final):
                    return

    def _detect(self, final: bool) -> bool:
        head = self._pending.lstrip()
        if head.startswith(PYTHON_TAG) or head.startswith("{"):
            self._state = "whole"
        elif not final and (not head or (PYTHON_TAG.startswith(head))):
            return False  # nothing visible yet, or maybe the start of <|python_tag|>
        else:
            self._state = "content"
        return True

    def _advance_content(self, out: StreamDelta, final: bool) -> bool:
        """Emit content up to a `<tool_call>`; True when a call starts (state changed)."""
        if self.fmt != "llama3":
            start = self._pending.find(TOOL_CALL_START)
            if start >= 0:
                self._emit_content(out, self._pending[:start])
                self._pending = self._pending[start + len(TOOL_CALL_START):]
                self._state = "call"
                self._segment_start = True
                return True
        keep = 0 if final or self.fmt == "llama3" else _held_prefix_len(self._pending, TOOL_CALL_START)
        self._emit_content(out, self._pending[:len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        if final:
            self._held_ws = ""  # whitespace at the very end is dropped
        return False

    def _emit_content(self, out: StreamDelta, text: str) -> None:
        if self._segment_start:
            text = text.lstrip()
            if not text:
                return
            self._segment_start = False
        body = text.rstrip()
        if body:
            out.content += self._held_ws + body
            self.result.content += self._held_ws + body
            self._held_ws = text[len(body):]
        else:
            self._held_ws += text

    def _advance_call(self, out: StreamDelta, final: bool) -> bool:
        """Stream a hermes call's arguments; True when its block closed (state back to content)."""
        end = _call_end(self._pending)
        if end < 0 and not final:
            self._stream_arguments(out)
            return False
        block = self._pending if end < 0 else self._pending[:end]
        self._pending = "" if end < 0 else self._pending[end + len(TOOL_CALL_END):]
        if end < 0:
            self._cut(out, block)
        else:
            self._close_call(out, block)
        self._state = "content"
        return end >= 0

    def _cut(self, out: StreamDelta, block: str) -> None:
        """The text ended inside a call (max_tokens, a stop string): the call is incomplete, not malformed. It is
        left out of the calls and the errors, as vLLM's parsers leave it out, and kept as `result.cut`; the calls
        before it stand. Only when its first part was streamed does the stream carry it as an error naming the
        index, so that the client drops what it got of it."""
        index = self._call_index
        self._call_index, self._args_sent = None, ""
        self.result.cut = ToolCallError(f"unterminated {TOOL_CALL_START}: generation stopped inside the call",
                                        block.strip(), index)
        if index is not None:
            out.errors.append(self.result.cut)

    def _stream_arguments(self, out: StreamDelta) -> None:
        if self._call_index is None:
            match = _HERMES_HEADER.match(self._pending)
            if match is None:
                return
            try:
                name = json.loads(f'"{match.group(1)}"')
            except ValueError:
                return  # a broken escape: the whole block is judged when it closes
            if self.tool_names is not None and name not in self.tool_names:
                return  # refused when the block closes; nothing of it is streamed
            self._call_index, self._call_id, self._call_name = self._next_index, self._new_id(), name
            self._next_index += 1
            self._args_start = match.end()
            out.tool_calls.append(ToolCallDelta(index=self._call_index, id=self._call_id, name=name, arguments=""))
        available = self._pending[self._args_start:]
        # The last '}' so far may close the call object rather than the arguments: hold it and what follows.
        last_brace = available.rfind("}")
        safe = (available if last_brace < 0 else available[:last_brace]).rstrip()
        if len(safe) > len(self._args_sent):
            chunk = safe[len(self._args_sent):]
            self._args_sent = safe
            out.tool_calls.append(ToolCallDelta(index=self._call_index, arguments=chunk))

    def _close_call(self, out: StreamDelta, block: str) -> None:
        index, sent = self._call_index, self._args_sent
        self._call_index, self._args_sent = None, ""
        try:
            obj = json.loads(block)
        except ValueError as e:
            obj, parsed = None, f"tool call is not valid JSON ({e.msg} at char {e.pos})"
        else:
            parsed = call_from_object(obj, self.tool_names)
            # A name-first call may be streamed before it closes, so whole and streamed parses agree only if the
            # object ends with its arguments: anything after them (extra or repeated keys) is refused in both.
            if not isinstance(parsed, str) and _HERMES_HEADER.match(block) and self._pending_args_text(block) is None:
                parsed = 'a tool call must be {"name": ..., "arguments": {...}} with nothing after the arguments'
        if isinstance(parsed, str):
            self._refuse(out, parsed, block, index)
            return
        name, canonical = parsed
        # The model's own argument text when it is exactly the arguments object: the streamed pieces are a prefix
        # of it, and a whole parse of the same text gives the same string.
        raw = self._pending_args_text(block)
        arguments = canonical if raw is None else raw
        if index is not None:
            if not arguments.startswith(sent) or name != self._call_name:
                self._refuse(out, "tool call changed after its first part was streamed", block, index)
                return
            call = ToolCall(id=self._call_id, name=name, arguments=arguments)
            if len(arguments) > len(sent):
                out.tool_calls.append(ToolCallDelta(index=index, arguments=arguments[len(sent):]))
        else:
            call = ToolCall(id=self._new_id(), name=name, arguments=arguments)
            out.tool_calls.append(ToolCallDelta(index=self._next_index, id=call.id, name=name, arguments=arguments))
            self._next_index += 1
        self.result.tool_calls.append(call)

    def _pending_args_text(self, block: str) -> str | None:
        """The model's argument text of a name-first block (between the header and the closing brace)."""
        match = _HERMES_HEADER.match(block)
        if match is None:
            return None
        raw = block[match.end():].rstrip()
        if not raw.endswith("}"):
            return None
        raw = raw[:-1].rstrip()
        try:
            return raw if isinstance(json.loads(raw), dict) else None
        except ValueError:
            return None

    def _refuse(self, out: StreamDelta, message: str, raw: str, index: int | None) -> None:
        error = ToolCallError(message=message, raw=raw.strip(), index=index)
        out.errors.append(error)
        self.result.errors.append(error)

    def _finish_whole(self, out: StreamDelta) -> bool:
        """A llama3 reply: one or more call objects (`;`-separated). True when it is plain content that opened
        with `{` instead (left in `_pending` for the content state, which in auto mode still finds hermes calls)."""
        text = self._pending.strip()
        self._pending = ""
        tagged = text.startswith(PYTHON_TAG)
        body = text[len(PYTHON_TAG):].strip() if tagged else text
        calls, problem = self._decode_llama_calls(body)
        if problem is None:
            for name, arguments in calls:
                call = ToolCall(id=self._new_id(), name=name, arguments=arguments)
                out.tool_calls.append(ToolCallDelta(index=self._next_index, id=call.id, name=name,
                                                    arguments=arguments))
                self._next_index += 1
                self.result.tool_calls.append(call)
        elif tagged or _LOOKS_LIKE_LLAMA_CALL.match(body):
            self._refuse(out, problem, text, None)
        else:
            self._state, self._pending = "content", text
            return True
        return False

    def _decode_llama_calls(self, body: str) -> tuple[list[tuple[str, str]], str | None]:
        decoder = json.JSONDecoder()
        calls: list[tuple[str, str]] = []
        pos = 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except ValueError as e:
                if not _cut_call(body[pos:], e.msg, e.pos - pos):
                    return [], f"tool call is not valid JSON ({e.msg} at char {e.pos})"
                self.result.cut = ToolCallError("generation stopped inside the call", body[pos:], None)
                break
            if isinstance(obj, dict) and self.tool_names is None and not ({"parameters", "arguments"} & obj.keys()):
                return [], 'a tool call needs "parameters" (or "arguments")'
            parsed = call_from_object(obj, self.tool_names, argument_keys=("parameters", "arguments"))
            if isinstance(parsed, str):
                return [], parsed
            calls.append(parsed)
            while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
                pos += 1
        if not calls and self.result.cut is None:
            return [], "empty tool call"
        return calls, None


def _call_end(block: str) -> int:
    """Where the call's `</tool_call>` starts in `block` (-1: not yet): the first one outside a JSON string. An
    argument string may hold the marker's text (a sampled reply did), and it does not end the call."""
    start = 0
    while (end := block.find(TOOL_CALL_END, start)) >= 0:
        if not _inside_string(block[:end]):
            return end
        start = end + 1
    return -1


def _inside_string(text: str) -> bool:
    inside, escaped = False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = inside
        elif ch == '"':
            inside = not inside
    return inside


def _cut_call(rest: str, error: str, at: int) -> bool:
    """Whether `rest`, a call object the JSON decoder failed on at `at`, is a call the text ended inside (rather
    than a malformed one): it opens as a call and the decoder ran out of text, not into a wrong character."""
    return bool(_LOOKS_LIKE_LLAMA_CALL.match(rest)) and (at >= len(rest.rstrip()) or
                                                         error.startswith("Unterminated string"))


def parse_tool_calls(text: str, fmt: str = "hermes", tool_names: Collection[str] | None = None,
                     id_factory: IdFactory = new_tool_call_id) -> ParsedOutput:
    """Parse a finished assistant text (non-streaming responses)."""
    parser = StreamingToolParser(fmt, tool_names, id_factory)
    parser.feed(text)
    parser.finish()
    return parser.result
