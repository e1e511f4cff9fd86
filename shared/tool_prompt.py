"""Tools on a chat template that has no tools section: the Hermes / Qwen2.5 form, written into the messages.

Many chat templates (SmolLM2's ChatML among them) never read `tools` and print only `role` and `content`, so a
request's tool schemas, the assistant's earlier calls and the tools' answers would vanish from the prompt without a
word. For such a template the messages are rewritten before rendering, into the text Qwen2.5's template would have
produced (the form `services/toolcoord/parser.py` reads back from the model's reply):

  * the schemas, one JSON object a line inside `<tools></tools>` with Qwen2.5's instructions, end the system
    message (or form one; or open the first user message when the template refuses a system role);
  * an assistant's calls become `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` after its text;
  * tool answers become one user turn of `<tool_response>\\n...\\n</tool_response>` blocks per run of tool messages.

Whether a template has a tools section is decided by behaviour, not by reading its source: it is rendered once with
a probe tool, a probe call and a probe answer, and counts as tool-aware only if all three come out in the text. A
template that mentions `tools` but drops a call, or raises on the `tool` role, gets the fallback too.
"""

from __future__ import annotations

import json
from typing import Any, Callable

# render(messages, tools) -> prompt text, raising on anything the template refuses
Render = Callable[[list[dict[str, Any]], "list[dict[str, Any]] | None"], str]

TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

# Distinctive strings that no template prints by itself. The call id is 9 alphanumerics: Mistral's templates
# refuse any other shape, and a refusal would be misread as "no tools section".
_PROBE_TOOL = "specrelay_probe_tool"
_PROBE_CALL = "specrelay_probe_call"
_PROBE_ANSWER = "specrelay_probe_answer"
_PROBE_SYSTEM = "specrelay_probe_system"
_PROBE_ID = "probe0001"


def text_content(content: Any) -> str:
    """A message's content as one string: None is empty, a list of text parts is their texts joined (as the
    Qwen2.5 template joins them). Templates that only know strings then render every OpenAI content shape."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "refusal") and isinstance(part.get(kind), str):  # a refusal is what was said
                texts.append(part[kind])
            else:
                raise ValueError(f"content part {part!r} is not a text part ({{'type': 'text', 'text': ...}})")
        return "".join(texts)
    raise ValueError(f"content must be a string, a list of text parts or null, not {type(content).__name__}")


def plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages whose content is always a string (see `text_content`)."""
    return [{**m, "content": text_content(m.get("content"))} for m in messages]


def renders_tools(render: Render) -> bool:
    """Whether the template prints a tool's schema, an assistant's call and a tool's answer (see the module doc)."""
    tool = {"type": "function", "function": {
        "name": _PROBE_TOOL, "description": "probe",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}
    call = {"id": _PROBE_ID, "type": "function", "function": {"name": _PROBE_CALL, "arguments": '{"x": "y"}'}}
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": _PROBE_ID, "name": _PROBE_CALL, "content": _PROBE_ANSWER}]
    try:
        text = render(messages, [tool])
    except Exception:  # a template that refuses tools or the tool role has no usable tools section
        return False
    return all(probe in text for probe in (_PROBE_TOOL, _PROBE_CALL, _PROBE_ANSWER))


def renders_system(render: Render) -> bool:
    """Whether the template prints a system message (Gemma's refuses one)."""
    try:
        return _PROBE_SYSTEM in render([{"role": "system", "content": _PROBE_SYSTEM},
                                        {"role": "user", "content": "hi"}], None)
    except Exception:
        return False


def needs_tools_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    """Whether anything tool-related would be lost on a template without a tools section."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def tools_section(tools: list[dict[str, Any]]) -> str:
    return TOOLS_PREAMBLE + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_POSTAMBLE


def tool_call_text(call: dict[str, Any]) -> str:
    """One call as Qwen2.5 writes it; string arguments go in verbatim (the client's spelling is what the model
    wrote), an object is written as JSON."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'<tool_call>\n{{"name": {json.dumps(function["name"], ensure_ascii=False)}, "arguments": {arguments}}}\n</tool_call>'


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    system_role: bool = True) -> list[dict[str, Any]]:
    """Messages (content already plain strings) rewritten so that a template printing only role and content
    shows the tools, the calls and the answers. `system_role=False` puts the schemas at the top of the first user
    message instead of in a system message."""
    out: list[dict[str, Any]] = []
    previous_role = None
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(tool_call_text(c) for c in m["tool_calls"])
            text = f"{m['content']}\n{calls}" if m["content"] else calls
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": text})
        elif m.get("role") == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if previous_role == "tool":  # a run of answers is one user turn, as in Qwen2.5
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append(dict(m))
        previous_role = m.get("role")
    if tools:
        section = tools_section(tools)
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{section}" if out[0]["content"] else section
        elif system_role:
            out.insert(0, {"role": "system", "content": section})
        else:
            first_user = next((m for m in out if m.get("role") == "user"), None)
            if first_user is None:
                out.insert(0, {"role": "user", "content": section})
            else:
                first_user["content"] = f"{section}\n\n{first_user['content']}"
    return out
