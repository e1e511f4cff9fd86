"""Request bodies of the OpenAI endpoints as msgspec Structs, and the checks msgspec cannot express.

Decoding is strict about types (a string where a number belongs is a 400 naming the field) and lenient about
unknown fields (SDKs send fields we do not use; they are ignored, as OpenAI-compatible servers do). Every refusal
is an `ApiError(400)` whose `param` is the field's path, e.g. `messages[2].tool_calls[0].function.name`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

import msgspec

from specrelay.services.gateway.errors import ApiError, bad_request

SLO_CLASSES = ("interactive", "deadline", "batch")
MAX_STOP_STRINGS = 4

# Free-form JSON (a tool's parameter schema, response_format) nests at most this deep: templates and tool code walk
# it recursively, and a JSON Schema needs nowhere near this many levels.
MAX_JSON_DEPTH = 64

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


# OpenAI chat fields this server refuses when set to anything but null, and why (never accepted and ignored).
UNSUPPORTED_CHAT = {
    "functions": "the legacy 'functions' parameter is not supported: send the same schemas as 'tools' "
                 "([{\"type\": \"function\", \"function\": {...}}])",
    "function_call": "the legacy 'function_call' parameter is not supported: use 'tool_choice'",
    "audio": "audio output is not supported (this server generates text)",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is not supported: the served model is not a reasoning model",
    "verbosity": "verbosity is not supported by the served model",
    "web_search_options": "web search is not supported",
}
SERVICE_TIERS = ("auto", "default")  # one tier here: what these two promise; flex / priority / scale are refused


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


def json_depth(value: Any) -> int:
    """How deep containers nest in a decoded JSON value (a scalar is 0, {} and [1] are 1); iterative."""
    depth, level = 0, [value]
    while containers := [v for v in level if isinstance(v, (dict, list))]:
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def check_sampling(req: Sampling, max_tokens: int | None, max_tokens_param: str) -> None:
    """Value checks shared by both endpoints (types were checked by `decode`)."""
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported: specrelay returns one choice per request (n=1)",
                          param="n", code="unsupported_value")
    if req.logprobs is not None and req.logprobs is not False:  # completions' logprobs=0: the sampled token's
        raise bad_request("logprobs are not supported", param="logprobs", code="unsupported_value")
    if req.top_logprobs:
        raise bad_request("top_logprobs is not supported (logprobs are not)", param="top_logprobs",
                          code="unsupported_value")
    if req.response_format is not None:
        _check_depth(req.response_format, "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported (only 0)", param=name, code="unsupported_value")
    if req.logit_bias and any(req.logit_bias.values()):
        raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_value")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param,
                          code="invalid_value")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {req.temperature}", param="temperature",
                          code="invalid_value")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {req.top_p}", param="top_p", code="invalid_value")
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


def _check_depth(value: Any, param: str) -> None:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise bad_request(f"{param} nests deeper than {MAX_JSON_DEPTH} levels", param=param, code="invalid_value")


def top_k(req: Sampling) -> int:
    """The top-k the verifier applies: 0 (off) for none, 0 or -1."""
    return max(req.top_k or 0, 0)


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
        if params is not None:
            _check_depth(params, f"tools[{i}].function.parameters")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise bad_request(f"tool_choice names {req.tool_choice.function.name!r}, which is not among the tools",
                          param="tool_choice", code="invalid_value")
    if req.tool_choice == "required" and not names:
        raise bad_request("tool_choice 'required' needs tools", param="tool_choice", code="invalid_value")
    for field, why in UNSUPPORTED_CHAT.items():
        if getattr(req, field) is not None:
            raise bad_request(why, param=field, code="unsupported_parameter")
    if req.store:
        raise bad_request("store=true is not supported: this server stores no completion", param="store",
                          code="unsupported_value")
    if req.metadata:
        raise bad_request("metadata tags a stored completion, and this server stores none", param="metadata",
                          code="unsupported_value")
    if req.modalities is not None and req.modalities != ["text"]:
        raise bad_request(f"modalities {req.modalities} are not supported (only [\"text\"])", param="modalities",
                          code="unsupported_value")
    if req.service_tier is not None and req.service_tier not in SERVICE_TIERS:
        raise bad_request(f"service_tier {req.service_tier!r} is not supported (only {', '.join(SERVICE_TIERS)})",
                          param="service_tier", code="unsupported_value")
    return max_tokens


def check_completion(req: CompletionRequest) -> int | None:
    check_sampling(req, req.max_tokens, "max_tokens")
    if req.echo:
        raise bad_request("echo is not supported", param="echo", code="unsupported_value")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")
    if req.best_of not in (None, 1):
        raise bad_request(f"best_of={req.best_of} is not supported: specrelay generates one candidate per request "
                          f"(best_of=1)", param="best_of", code="unsupported_value")
    prompt = completion_prompt(req)
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt", code="invalid_value")
    return req.max_tokens


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The request's one prompt, text or token ids. OpenAI's forms: "text", ["text"], [ids], [[ids]]; a list of
    several prompts (a batch: one choice per prompt) is refused, as specrelay answers one choice per request."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        if len(prompt) > 1:
            raise bad_request(f"one prompt per request: this list holds {len(prompt)} prompts (a batch is not "
                              f"supported)", param="prompt", code="unsupported_value")
        return prompt[0]
    if _is_token_ids(prompt):
        return prompt
    raise bad_request("prompt must be a string, a list of token ids, or a list holding one of those",
                      param="prompt", code="invalid_value")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)  # JSON true/false decode as bool


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
    """The tools as the client wrote them: fields it left out (e.g. `strict`) stay out of the prompt rather than
    printing as null. Only the tool's and the function's own fields: a null inside `parameters` is the client's."""
    if not req.tools or req.tool_choice == "none":
        return None
    out = []
    for tool in req.tools:
        d = {k: v for k, v in msgspec.to_builtins(tool).items() if v is not None}
        d["function"] = {k: v for k, v in d["function"].items() if v is not None}
        out.append(d)
    return out


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
