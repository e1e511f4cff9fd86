"""Tool calls as the OpenAI API shapes them, and the validation every chat format shares.

A malformed call never raises: it becomes a `ToolCallError` that the gateway puts in the response (and the
`tool_call_errors` of a streamed chunk), so that the client sees what the model wrote and why it was refused.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """OpenAI-style id: `call_` and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


IdFactory = Callable[[], str]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call. The first piece of call `index` carries id and name; later ones only
    argument text. Concatenating the `arguments` of one index gives the call's arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        function: dict[str, str] = {"arguments": self.arguments}
        if self.name is not None:
            function = {"name": self.name, "arguments": self.arguments}
        out["function"] = function
        return out


@dataclass(frozen=True)
class ToolCallError:
    """A call the model tried to make but wrote wrongly. `index` is set when its first delta was already
    streamed (the client must drop that call); `raw` is the text the model produced for it."""

    message: str
    raw: str
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "tool_call_error", "message": self.message, "raw": self.raw}
        if self.index is not None:
            out["index"] = self.index
        return out


@dataclass
class ParsedOutput:
    """The assistant message of a finished turn: text content, well-formed calls, refused calls."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    # The call the text ended inside (max_tokens): incomplete rather than wrong, so neither a call nor an error;
    # the complete calls before it stand, and the turn's finish_reason is the verifier's ("length").
    cut: ToolCallError | None = None

    @property
    def finish_reason(self) -> str | None:
        """"tool_calls" when the turn ends in calls for the client; None leaves the verifier's own reason."""
        return "tool_calls" if self.tool_calls and self.cut is None else None

    def to_openai_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


@dataclass
class StreamDelta:
    """What one `feed` produced: content text, call pieces, refused calls. Empty when everything is held back."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls or self.errors)


def call_from_object(obj: Any, tool_names: Collection[str] | None,
                     argument_keys: tuple[str, ...] = ("arguments",)) -> tuple[str, str] | str:
    """(name, arguments JSON) of a decoded call object, or the reason it is not a valid call.

    `arguments` may be an object or a string holding a JSON object (some models double-encode it); a missing
    arguments key means a call without parameters."""
    if not isinstance(obj, dict):
        return f"a tool call must be a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return 'a tool call needs a non-empty string "name"'
    if tool_names is not None and name not in tool_names:
        return f"unknown tool {name!r} (available: {', '.join(sorted(tool_names)) or 'none'})"
    key = next((k for k in argument_keys if k in obj), None)
    args: Any = {} if key is None else obj[key]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return f"tool {name!r}: arguments is a string that is not JSON"
    if not isinstance(args, dict):
        return f"tool {name!r}: arguments must be a JSON object, got {type(args).__name__}"
    return name, json.dumps(args, ensure_ascii=False)
