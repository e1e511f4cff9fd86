"""Structured outputs: a request's `response_format` and forced `tool_choice` as the grammar its Generate carries
(`SamplingSpec.grammar`, shared/grammar.py); the verifier masks the target with it at every token and tree node.

  * tool_choice named / "required" (with client tools): the call the gateway's forced opening begins, its
    arguments valid for the function's schema; `parallel_tool_calls: false` -> exactly one call.
  * response_format json_schema -> JSON matching `json_schema.schema`; json_object -> any JSON object.
  * response_format json with tools the model may call (tool_choice auto) is refused: the reply would have to be
    either a call or the JSON, and that union is not built here.
A schema llguidance cannot compile is a 400 naming the parameter, before anything is queued.
"""

from __future__ import annotations

from typing import Any

from specrelay.services.gateway.errors import bad_request
from specrelay.services.gateway.schemas import NamedToolChoice, Sampling
from specrelay.shared.grammar import TOOL_MARKERS, GrammarError, json_grammar, tool_call_grammar

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def check_response_format(rf: dict[str, Any] | None) -> None:
    """The shape OpenAI documents; the schema itself is checked when it is compiled."""
    if rf is None:
        return
    kind = rf.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad_request(f"response_format type {kind!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                          param="response_format.type", code="invalid_value")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                              "{...}}}", param="response_format.json_schema", code="invalid_value")


def response_format_grammar(req: Sampling) -> str | None:
    rf = req.response_format
    check_response_format(rf)
    if rf is None or rf.get("type") == "text":
        return None
    if req.ignore_eos:
        raise bad_request("ignore_eos cannot be combined with response_format: a structured reply ends when it is "
                          "complete", param="ignore_eos", code="invalid_value")
    # json_object: any object (None); a json_schema without a schema: any JSON value ({})
    schema = rf["json_schema"].get("schema", {}) if rf["type"] == "json_schema" else None
    try:
        return json_grammar(schema)
    except GrammarError as e:
        raise bad_request(f"response_format: the schema cannot be compiled: {e}",
                          param="response_format.json_schema.schema", code="invalid_value") from None


def chat_grammar(req: Any, client_tools: list[dict[str, Any]] | None, fmt: str, token_to_id) -> str | None:
    """The grammar of a chat request (ChatCompletionRequest; `client_tools` as the template shows them), or None.
    `token_to_id`: the model's vocabulary lookup (the `<tool_call>` markers may be single tokens)."""
    check_response_format(req.response_format)  # a forced call is the whole reply: the format has no text to shape
    choice = req.tool_choice
    forced = bool(client_tools) and (choice == "required" or isinstance(choice, NamedToolChoice))
    if not forced:
        if client_tools and req.response_format and req.response_format.get("type") != "text":
            raise bad_request("response_format with tools the model may call is not supported: set tool_choice "
                              "to 'none', 'required' or a function", param="response_format",
                              code="unsupported_value")
        return response_format_grammar(req)
    if req.ignore_eos:
        raise bad_request("ignore_eos cannot be combined with a forced tool_choice: the call ends when it is "
                          "complete", param="ignore_eos", code="invalid_value")
    tools = {t["function"]["name"]: t["function"].get("parameters") for t in client_tools}
    name = choice.function.name if isinstance(choice, NamedToolChoice) else None
    ids = {m: i for m in TOOL_MARKERS if (i := token_to_id(m)) is not None}
    try:
        return tool_call_grammar(fmt, tools, name, req.parallel_tool_calls is not False, ids)
    except GrammarError as e:
        raise bad_request(f"tools: a function's parameters cannot be compiled: {e}", param="tools",
                          code="invalid_value") from None
