"""Request bodies of the OpenAI endpoints as msgspec Structs, and `decode`: bytes -> a Struct, or a 400.

Decoding is strict about types (a string where a number belongs is a 400 naming the field) and lenient about
unknown fields (SDKs send fields we do not use; they are ignored, as OpenAI-compatible servers do). Every refusal
is an `ApiError(400)` whose `param` is the field's path, e.g. `messages[2].tool_calls[0].function.name`. The value
checks msgspec cannot express are in checks.py.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

import msgspec

from specrelay.services.gateway.errors import bad_request

ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
# Integers travel to the verifier as msgpack, which holds 64 bits: a seed is an int64, as OpenAI and vLLM take it.
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
TopK = Annotated[int, msgspec.Meta(ge=-1, le=2**63 - 1)]  # -1 or 0: off (vLLM's convention)


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    """An earlier assistant turn's refusal, sent back as history (OpenAI allows it in assistant content only)."""

    refusal: str


Content = Union[str, list[TextPart], None]
AssistantContent = Union[str, list[Union[TextPart, RefusalPart]], None]


class FunctionCall(msgspec.Struct):
    name: ToolName
    arguments: str = "{}"  # a JSON object as text, as the OpenAI API sends it


class MessageToolCall(msgspec.Struct):
    function: FunctionCall
    id: str = ""
    type: Literal["function"] = "function"


class SystemMessage(msgspec.Struct, tag_field="role", tag="system"):
    content: Content = None
    name: str | None = None


class DeveloperMessage(msgspec.Struct, tag_field="role", tag="developer"):
    content: Content = None
    name: str | None = None


class UserMessage(msgspec.Struct, tag_field="role", tag="user"):
    content: Content = None
    name: str | None = None


class AssistantMessage(msgspec.Struct, tag_field="role", tag="assistant"):
    content: AssistantContent = None
    tool_calls: list[MessageToolCall] | None = None
    name: str | None = None
    refusal: str | None = None  # OpenAI's reply field, as SDKs send a reply back: the text the assistant said

    def __post_init__(self):
        # A refusal is what the assistant said: templates see it as text, wherever OpenAI put it.
        if isinstance(self.content, list):
            self.content = [TextPart(p.refusal) if isinstance(p, RefusalPart) else p for p in self.content]
        if self.content is None and self.refusal is not None:
            self.content = self.refusal
        self.refusal = None


class ToolMessage(msgspec.Struct, tag_field="role", tag="tool"):
    content: Content = None
    tool_call_id: str | None = None


Message = Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage]


class FunctionDef(msgspec.Struct):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct):
    name: ToolName


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class Sampling(msgspec.Struct, kw_only=True):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: TopK | None = None  # an extension (vLLM has it too)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None  # OpenAI's fields are nullable: null is the default
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for abuse monitoring: accepted, changes no output (as at OpenAI)
    response_format: dict[str, Any] | None = None
    ignore_eos: bool | None = None  # vLLM's: generate past the model's end-of-turn tokens (benchmark clients)
    # specrelay extensions (also as headers X-SLO-Class / X-Deadline-Ms)
    slo_class: str | None = None
    deadline_ms: float | None = None  # relative to arrival


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # tags of a stored completion: with store refused, only null or {}
    modalities: list[str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # OpenAI's cache-routing hint: one server, accepted, changes no output
    safety_identifier: str | None = None  # as `user`
    # Refused whenever set (UNSUPPORTED_CHAT): typed Any so that any value gets the message saying why.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class CompletionRequest(Sampling, kw_only=True):
    # text, [text], token ids or [token ids] (msgspec allows one array type in a union: `completion_prompt` checks)
    prompt: str | list[Any]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


_PATH = re.compile(r" - at `\$\.?(.*)`$")
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode(body: bytes, type: type[msgspec.Struct]) -> Any:
    """Bytes -> request Struct, or a 400 naming the offending field."""
    if not body.strip():
        raise bad_request("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as e:
        raise _invalid(e) from None
    except msgspec.DecodeError as e:
        # msgspec refuses a lone UTF-16 surrogate escape ("\ud800"), which JSON's grammar allows and clients send
        # (text cut mid-emoji): the stdlib parser takes it, and the surrogate becomes U+FFFD.
        try:
            return msgspec.convert(_without_surrogates(_stdlib_json(body)), type=type)
        except msgspec.ValidationError as e2:
            raise _invalid(e2) from None
        except (ValueError, RecursionError):
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body nests too deeply to parse", code="invalid_json") from None


def _invalid(e: msgspec.ValidationError):
    text = str(e)
    match = _PATH.search(text)
    param = match.group(1) if match else None
    message = text[: match.start()] if match else text
    return bad_request(f"{message}" + (f" (at '{param}')" if param else ""), param=param or None,
                       code="invalid_value")


def _stdlib_json(body: bytes) -> Any:
    def constant(name: str):  # NaN and Infinity are Python's extension, not JSON
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=constant)


def _without_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (keys included) replaced by U+FFFD; iterative, as the
    value may nest as deep as the parser allowed."""
    def fix(v: Any) -> Any:
        return _SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v

    root = [fix(value)]
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        fixed = [(fix(k), fix(v)) for k, v in items]
        if isinstance(node, dict):
            node.clear()
        for k, v in fixed:
            node[k] = v
            if isinstance(v, (dict, list)):
                stack.append(v)
    return root[0]
