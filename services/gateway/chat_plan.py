"""A checked chat request rendered for the model: the chat template over its messages and tools (the client's and
the server's; a forced tool_choice's opening of a call appended), tokenized, with its sampling and grammar ->
a `ChatPlan` that `ChatTurns` (tool_rounds.py) runs. Chat completions and the Responses API share it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from specrelay.services.gateway.errors import bad_request
from specrelay.services.gateway.exchange import PROMPT_PARAM, Exchange, encode, prepare
from specrelay.services.gateway.generation import Timing
from specrelay.services.gateway.schemas import ChatCompletionRequest, NamedToolChoice
from specrelay.services.gateway.state import Gateway
from specrelay.services.gateway.structured import chat_grammar
from specrelay.services.gateway.tool_rounds import ChatPlan
from specrelay.services.gateway.tools import CLIENT_TOOL_HOLD_S
from specrelay.shared.tokenizer import TemplateError


async def plan_chat(gw: Gateway, request: web.Request, req: ChatCompletionRequest, max_tokens: int | None,
                    timing: Timing, id_prefix: str = "chatcmpl") -> ChatPlan:
    """Render and tokenize a checked chat request (`check_chat`, `check_model`), ready to admit."""
    client_tools = tools_for_template(req)
    server = gw.server_tools if req.tool_choice != "none" else None  # "none": no tool of either side
    tools = server.template_tools(client_tools) if server is not None else client_tools
    forced = _forced_prefix(gw.config.tool_call_format, req.tool_choice) if client_tools else ""
    grammar = chat_grammar(req, client_tools, gw.config.tool_call_format, gw.tokenizer.token_to_id)
    messages = messages_for_template(req)
    try:
        prompt_text = gw.tokenizer.render_chat(messages, tools) + forced
    except TemplateError as e:
        raise bad_request(str(e), param=PROMPT_PARAM[id_prefix], code="invalid_value") from None
    prep = prepare(gw, request, req, await encode(gw, prompt_text), max_tokens, id_prefix, timing, grammar)
    if server is not None and server.max_rounds > 0:  # keep the turn's KV for a tool round (tool_rounds.py)
        prep.generate = msgspec.structs.replace(prep.generate, hold_s=server.hold_s)
    elif client_tools:  # until the turn is parsed: a client tool pause hands the KV to the retention policy
        prep.generate = msgspec.structs.replace(prep.generate, hold_s=CLIENT_TOOL_HOLD_S)
    return ChatPlan(Exchange(gw, request, prep), messages, tools, {t["function"]["name"] for t in client_tools or []},
                    forced, server, 1 if req.parallel_tool_calls is False else None)


def _forced_prefix(fmt: str, choice: Any) -> str:
    """Text appended after the generation prompt so the model must call a tool: the opening of a call in the
    model's own format (the verifier continues from it; the parser reads it as the start of the reply)."""
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        return (f'{{"name": "{name}", "parameters": ' if fmt == "llama3" else
                f'<tool_call>\n{{"name": "{name}", "arguments": ')
    if choice == "required":
        return '{"name": "' if fmt == "llama3" else '<tool_call>\n{"name": "'
    return ""


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

