"""What a request's output must match, as an llguidance grammar (Lark with embedded JSON schemas): the spec a
request carries over the bus (`SamplingSpec.grammar`, plain text) and each side compiles against its tokenizer
(`grammar_mask.py`).

  * `response_format` json_schema / json_object -> the JSON the schema describes (`json_grammar`);
  * `tool_choice` a named function or "required" -> the tool call the chat template's format implies
    (`tool_call_grammar`), continuing the opening the gateway already appended to the prompt
    (`openai_api._forced_prefix`): the rest of the call, its `arguments` valid for that function's schema, then
    further calls only when `parallel_tool_calls` is not false. What the grammar lets through is exactly what
    `services/toolcoord/parser.py` reads as calls.

Plain Python and llguidance only (no torch): the gateway validates a request's grammar here and answers a 400
naming the error, so a schema llguidance cannot compile never reaches a verifier.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

# The call forms, after the gateway's forced opening (`_forced_prefix`), as the parser reads them back.
#   hermes: <tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>, several separated by a newline
#   llama3: {"name": "NAME", "parameters": {...}}, several separated by "; "
# Each piece is a list of parts; a part that is one token of the model's vocabulary (an added `<tool_call>`) is
# matched as that token or as its text.
_FORMS = {
    "hermes": (["<tool_call>", '\n{"name": "'], ['", "arguments": '], ["}\n", "</tool_call>"], ["\n"]),
    "llama3": (['{"name": "'], ['", "parameters": '], ["}"], ["; "]),
}
TOOL_MARKERS = ("<tool_call>", "</tool_call>")  # look these up in the model's vocabulary for `token_ids`
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """The request's schema or tools cannot be compiled into a grammar (the gateway answers 400)."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """A reply that is one JSON value matching `schema` (None: any JSON object, OpenAI's json_object)."""
    return check(f"start: {_json(schema)}")


def tool_call_grammar(fmt: str, tools: dict[str, dict[str, Any] | None], name: str | None,
                      parallel: bool = True, token_ids: dict[str, int] | None = None) -> str:
    """The rest of a forced reply: `name` set -> the call of that function whose opening (up to its arguments)
    is in the prompt; None ("required") -> the call whose opening up to the name is in the prompt, of any of
    `tools` (name -> parameters schema, None for none). Then, unless `parallel` is false, any number of further
    whole calls to the allowed functions. Arguments always match the function's schema. `token_ids`: the markers
    (`<tool_call>`, `</tool_call>`) that are single tokens of the model's vocabulary, with their ids."""
    token_ids = token_ids or {}
    lit = lambda parts: " ".join(  # noqa: E731
        f"(<[{token_ids[p]}]> | {_lit(p)})" if p in token_ids else _lit(p) for p in parts)
    opening, between, closing, separator = _FORMS["llama3" if fmt == "llama3" else "hermes"]
    allowed = [name] if name is not None else list(tools)
    if not allowed:
        raise GrammarError("a forced tool call needs at least one tool")
    rules = [f"call_{i}: {_lit(json.dumps(n)[1:-1])} {lit(between)} {_arguments(tools.get(n))} {lit(closing)}"
             for i, n in enumerate(allowed)]
    any_call = " | ".join(f"call_{i}" for i in range(len(allowed)))
    first = f"{_arguments(tools.get(name))} {lit(closing)}" if name is not None else "named_call"
    more = f" ({lit(separator + opening)} named_call)*" if parallel else ""
    return check("\n".join([f"start: {first}{more}", f"named_call: {any_call}", *rules]))


def check(grammar: str) -> str:
    """`grammar`, once llguidance has compiled it (without a tokenizer); GrammarError naming why it cannot."""
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error.strip().splitlines()[0])
    return grammar


def _json(schema: dict[str, Any] | None) -> str:
    """Lark's embedded JSON-schema rule, written as the chat template writes JSON (", " and ": " between items,
    no other whitespace): llguidance's default lets whitespace run on, and a sampled reply could spend its whole
    max_tokens on it."""
    schema = dict(ANY_OBJECT if schema is None else schema)
    schema["x-guidance"] = {**COMPACT, **schema.get("x-guidance", {})}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _arguments(schema: dict[str, Any] | None) -> str:
    """A call's arguments: always an object (the parser refuses anything else), valid for the schema."""
    return _json({"type": "object", **(schema or {})})


def _lit(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)
