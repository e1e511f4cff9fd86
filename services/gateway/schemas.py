"""Request bodies of the OpenAI endpoints as msgspec Structs, and the checks msgspec cannot express.

Decoding is strict about types (a string where a number belongs is a 400 naming the field) and lenient about
unknown fields (SDKs send fields we do not use; they are ignored, as OpenAI-compatible servers do). Every refusal
is an `ApiError(400)` whose `param` is the field's path, e.g. `messages[2].tool_calls[0].function.name`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec

from specrelay.services.gateway.errors import ApiError, bad_request

SLO_CLASSES = ("interactive", "deadline", "batch")
MAX_STOP_STRINGS = 4

ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


Content = Union[str, list[TextPart], None]


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
    content: Content = None
    tool_calls: list[MessageToolCall] | None = None
    name: str | None = None


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
    include_usage: bool = False


class Sampling(msgspec.Struct, kw_only=True):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM has it too)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # specrelay extensions (also as headers X-SLO-Class / X-Deadline-Ms)
    slo_class: str | None = None
    deadline_ms: float | None = None  # relative to arrival


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | list[str | int]  # text, [text], or token ids (msgspec allows one array type in a union)
    echo: bool = False
    suffix: str | None = None


_PATH = re.compile(r" - at `\$\.?(.*)`$")


def decode(body: bytes, type: type[msgspec.Struct]) -> Any:
    """Bytes -> request Struct, or a 400 naming the offending field."""
    if not body.strip():
        raise bad_request("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as e:
        text = str(e)
        match = _PATH.search(text)
        param = match.group(1) if match else None
        message = text[: match.start()] if match else text
        raise bad_request(f"{message}" + (f" (at '{param}')" if param else ""), param=param or None,
                          code="invalid_value") from None
    except msgspec.DecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def check_sampling(req: Sampling, max_tokens: int | None, max_tokens_param: str) -> None:
    """Value checks shared by both endpoints (types were checked by `decode`)."""
    if req.n != 1:
        raise bad_request(f"n={req.n} is not supported: specrelay returns one choice per request (n=1)",
                          param="n", code="unsupported_value")
    if req.logprobs:
        raise bad_request("logprobs are not supported", param="logprobs", code="unsupported_value")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request(f"response_format {req.response_format.get('type')!r} is not supported (only 'text')",
                          param="response_format", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported (only 0)", param=name, code="unsupported_value")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param,
                          code="invalid_value")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {req.temperature}", param="temperature",
                          code="invalid_value")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {req.top_p}", param="top_p", code="invalid_value")
    if req.top_k is not None and req.top_k < 0:
        raise bad_request(f"top_k must be >= 0, got {req.top_k}", param="top_k", code="invalid_value")
    stops = stop_strings(req)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}", param="stop",
                          code="invalid_value")
    if any(not s for s in stops):
        raise bad_request("stop sequences must be non-empty strings", param="stop", code="invalid_value")
    if req.slo_class is not None and req.slo_class not in SLO_CLASSES:
        raise bad_request(f"slo_class {req.slo_class!r} is not one of {', '.join(SLO_CLASSES)}",
                          param="slo_class", code="invalid_value")
    if req.deadline_ms is not None and not req.deadline_ms > 0:
        raise bad_request(f"deadline_ms must be > 0 (milliseconds from arrival), got {req.deadline_ms}",
                          param="deadline_ms", code="invalid_value")


def stop_strings(req: Sampling) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def check_chat(req: ChatCompletionRequest) -> int | None:
    """Chat-only checks; returns the requested output limit (max_completion_tokens wins over max_tokens)."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_sampling(req, max_tokens, param)
    if not req.messages:
        raise bad_request("messages must hold at least one message", param="messages", code="invalid_value")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", param="tools", code="invalid_value")
    for i, tool in enumerate(req.tools or []):
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise bad_request("a function's parameters must be a JSON Schema of type 'object'",
                              param=f"tools[{i}].function.parameters", code="invalid_value")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise bad_request(f"tool_choice names {req.tool_choice.function.name!r}, which is not among the tools",
                          param="tool_choice", code="invalid_value")
    if req.tool_choice == "required" and not names:
        raise bad_request("tool_choice 'required' needs tools", param="tool_choice", code="invalid_value")
    return max_tokens


def check_completion(req: CompletionRequest) -> int | None:
    check_sampling(req, req.max_tokens, "max_tokens")
    if req.echo:
        raise bad_request("echo is not supported", param="echo", code="unsupported_value")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")
    if isinstance(req.prompt, list):
        if not (all(isinstance(p, str) for p in req.prompt) or all(isinstance(p, int) for p in req.prompt)):
            raise bad_request("prompt must be a string, a list of strings or a list of token ids", param="prompt",
                              code="invalid_value")
        if len(req.prompt) > 1 and isinstance(req.prompt[0], str):
            raise bad_request("one prompt per request (a list of several prompts is not supported)",
                              param="prompt", code="unsupported_value")
    if not req.prompt or req.prompt == [""]:
        raise bad_request("prompt must not be empty", param="prompt", code="invalid_value")
    return req.max_tokens


def messages_for_template(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template (the role tag included, None fields left out)."""
    out = []
    for m in req.messages:
        d = {k: v for k, v in msgspec.to_builtins(m).items() if v is not None}
        if d["role"] == "developer":  # OpenAI's newer name for system instructions; templates know "system"
            d["role"] = "system"
        out.append(d)
    return out


def tools_for_template(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    return [{k: v for k, v in msgspec.to_builtins(t).items() if v is not None} for t in req.tools]


def header_extensions(headers: Any, req: Sampling) -> tuple[str | None, float | None]:
    """SLO class and relative deadline: body fields win over headers X-SLO-Class / X-Deadline-Ms."""
    slo, deadline = req.slo_class, req.deadline_ms
    if slo is None and headers.get("X-SLO-Class"):
        slo = headers["X-SLO-Class"].strip().lower()
        if slo not in SLO_CLASSES:
            raise ApiError(400, f"X-SLO-Class {slo!r} is not one of {', '.join(SLO_CLASSES)}",
                           param="X-SLO-Class", code="invalid_value")
    if deadline is None and headers.get("X-Deadline-Ms"):
        try:
            deadline = float(headers["X-Deadline-Ms"])
        except ValueError:
            deadline = -1.0
        if not deadline > 0:
            raise ApiError(400, "X-Deadline-Ms must be a positive number of milliseconds",
                           param="X-Deadline-Ms", code="invalid_value")
    return slo, deadline
