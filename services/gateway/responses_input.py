"""The Responses API request (`POST /v1/responses`) and its translation into a chat request.

The Responses API is served by the chat pipeline: `instructions` becomes the first system message, `input` (text or
a list of items) the conversation, function tools the chat tools. Items map one to one:

    {"role": "user" | "system" | "developer", "content": text | [input_text]}   -> that chat message
    {"role": "assistant", "content": text | [output_text | refusal]}            -> an assistant message
    {"type": "function_call", "call_id", "name", "arguments"}                    -> a tool call on the assistant
                                                                                    message before it (or a new one)
    {"type": "function_call_output", "call_id", "output"}                        -> a tool message

Stateless: this server keeps no response, so `previous_response_id`, `conversation` and `store: true` are refused
with a 400 that says to send the whole conversation as `input`; so is every other field it cannot honour. Unknown
fields are ignored as on the chat endpoints; the Responses fields OpenAI defines are each honoured or refused.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from specrelay.services.gateway.errors import bad_request
from specrelay.services.gateway.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    DeveloperMessage,
    FunctionCall,
    FunctionDef,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
    Seed,
    SystemMessage,
    Tool,
    ToolMessage,
    ToolName,
    TopK,
    UserMessage,
)

# Fields refused whenever set to anything but null, and why.
UNSUPPORTED = {
    "previous_response_id": "previous_response_id is not supported: this server stores no response (store: false); "
                            "send the whole conversation as 'input'",
    "conversation": "conversation is not supported: this server stores no conversation; send it as 'input'",
    "prompt": "prompt templates are not supported: send 'instructions' and 'input'",
    "top_logprobs": "top_logprobs is not supported (logprobs are not)",
    "max_tool_calls": "max_tool_calls is not supported",
    "context_management": "context_management is not supported",
    "prompt_cache_retention": "prompt_cache_retention is not supported (cached prefixes live while memory allows)",
}
NO_OP_INCLUDES = ("reasoning.encrypted_content",)  # this model writes no reasoning items: nothing to include


class InputText(msgspec.Struct, tag_field="type", tag="input_text"):
    text: str


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str


class Refusal(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


class MessageItem(msgspec.Struct):
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[Union[InputText, OutputText, Refusal]]]


class FunctionCallItem(msgspec.Struct):
    call_id: str
    name: ToolName
    arguments: str


class FunctionCallOutputItem(msgspec.Struct):
    call_id: str
    output: Union[str, list[Union[InputText, OutputText]]]


ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}


class FunctionTool(msgspec.Struct):
    type: str
    name: ToolName | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(msgspec.Struct):
    type: str
    name: ToolName | None = None


class TextFormat(msgspec.Struct):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class StreamOptions(msgspec.Struct):
    include_obfuscation: bool | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    input: Union[str, list[Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    store: bool | None = None
    include: list[str] | None = None
    text: TextFormat | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None  # echoed back on the response, as OpenAI does
    service_tier: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # extensions, as on the chat endpoints
    seed: Seed | None = None
    top_k: TopK | None = None
    slo_class: str | None = None
    deadline_ms: float | None = None
    # refused whenever set (UNSUPPORTED)
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    prompt_cache_retention: Any = None


def check_responses(req: ResponsesRequest) -> None:
    """The refusals a chat request cannot express (the rest is `check_chat`'s, on the translation)."""
    for field, why in UNSUPPORTED.items():
        if getattr(req, field) is not None:
            raise bad_request(why, param=field, code="unsupported_parameter")
    if req.store:
        raise bad_request("store=true is not supported: this server stores no response (send store: false)",
                          param="store", code="unsupported_value")
    if req.background:
        raise bad_request("background responses are not supported (they need a stored response)",
                          param="background", code="unsupported_value")
    if req.truncation == "auto":
        raise bad_request("truncation 'auto' is not supported: a conversation longer than the context is a 400",
                          param="truncation", code="unsupported_value")
    if req.stream_options is not None and req.stream_options.include_obfuscation:
        raise bad_request("stream obfuscation is not supported", param="stream_options.include_obfuscation",
                          code="unsupported_value")
    for include in req.include or []:
        if include not in NO_OP_INCLUDES:
            raise bad_request(f"include {include!r} is not supported", param="include", code="unsupported_value")
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise bad_request("reasoning is not supported: the served model is not a reasoning model",
                          param="reasoning", code="unsupported_parameter")
    if req.text is not None:
        fmt = (req.text.format or {}).get("type", "text")
        if fmt != "text":
            raise bad_request(f"text.format {fmt!r} is not supported (only 'text')", param="text.format",
                              code="unsupported_value")
        if req.text.verbosity is not None:
            raise bad_request("text.verbosity is not supported by the served model", param="text.verbosity",
                              code="unsupported_parameter")
    for i, tool in enumerate(req.tools or []):
        if tool.type != "function":
            raise bad_request(f"tool type {tool.type!r} is not supported (only 'function')", param=f"tools[{i}].type",
                              code="unsupported_value")
        if tool.name is None:
            raise bad_request("a function tool needs a name", param=f"tools[{i}].name", code="invalid_value")
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice) and (choice.type != "function" or choice.name is None):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
                          param="tool_choice", code="unsupported_value")


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that serves `req` (checked by `check_responses`)."""
    messages: list[Any] = [SystemMessage(content=req.instructions)] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, raw in enumerate(items):
        messages.extend(_message(_item(raw, i), messages))
    if not messages:
        raise bad_request("input must hold at least one item", param="input", code="invalid_value")
    tools = [Tool(function=FunctionDef(t.name, t.description, t.parameters, t.strict)) for t in req.tools or []]
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = NamedToolChoice(function=NamedFunction(name=choice.name))
    return ChatCompletionRequest(
        model=req.model, messages=messages, tools=tools or None, tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls, max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stream=req.stream,
        user=req.user, service_tier=req.service_tier, safety_identifier=req.safety_identifier,
        prompt_cache_key=req.prompt_cache_key, slo_class=req.slo_class, deadline_ms=req.deadline_ms)


def _item(raw: Any, i: int) -> MessageItem | FunctionCallItem | FunctionCallOutputItem:
    if not isinstance(raw, dict):
        raise bad_request("each input item must be an object", param=f"input[{i}]", code="invalid_value")
    kind = raw.get("type", "message")
    if not isinstance(kind, str) or kind not in ITEMS:
        raise bad_request(f"input item type {kind!r:.80} is not supported (message, function_call, "
                          f"function_call_output)", param=f"input[{i}].type", code="unsupported_value")
    try:
        return msgspec.convert({k: v for k, v in raw.items() if k != "type"}, ITEMS[kind])
    except msgspec.ValidationError as e:
        text = str(e)
        where = text.rsplit(" - at `$", 1)
        path = f"input[{i}]" + (where[1].rstrip("`") if len(where) == 2 else "")
        raise bad_request(f"{where[0]} (at '{path}')", param=path, code="invalid_value") from None


def _text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in content)


def _message(item: MessageItem | FunctionCallItem | FunctionCallOutputItem, before: list[Any]) -> list[Any]:
    """The chat messages `item` adds after `before` (a function call joins the assistant message just before)."""
    if isinstance(item, FunctionCallOutputItem):
        return [ToolMessage(content=_text(item.output), tool_call_id=item.call_id)]
    if isinstance(item, FunctionCallItem):
        call = MessageToolCall(function=FunctionCall(item.name, item.arguments), id=item.call_id)
        last = before[-1] if before else None
        if isinstance(last, AssistantMessage):
            last.tool_calls = [*(last.tool_calls or []), call]
            return []
        return [AssistantMessage(content=None, tool_calls=[call])]
    text = _text(item.content)
    role = {"user": UserMessage, "system": SystemMessage, "developer": DeveloperMessage,
            "assistant": AssistantMessage}[item.role]
    return [role(content=text)]
