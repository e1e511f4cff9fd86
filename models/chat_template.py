"""The chat template of the embedded pair (Qwen2.5 / Hermes style), and a plain-jinja2 renderer of it.

The same string goes into tokenizer_config.json (`chat_template`), so `AutoTokenizer.apply_chat_template` and
`render_chat` below produce the same text. The corpus is rendered through `render_chat`, which is why the model
has only ever seen exactly what the gateway will send it.

One difference between the two jinja environments matters: jinja2's built-in `tojson` HTML-escapes `<`, `>`, `&`
and `'`, transformers' does not (json.dumps, ensure_ascii=False). `render_chat` installs the transformers behaviour.
"""

from __future__ import annotations

import json
from typing import Any

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # pad, and the separator between packed training documents
    "<|im_start|>",
    "<|im_end|>",  # eos of a chat turn
)
# Added tokens (one id each, never split by BPE) that are not skipped on decode: the tool-call parser needs them
# in the text, as with Qwen2.5.
TOOL_TOKENS: tuple[str, ...] = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"

# Whitespace control: every `{%-` trims what precedes it, so the literal text is only what sits inside `{{ }}` and
# the explicit '\n' strings. The tools preamble is kept short on purpose: a tiny model pays for every token.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable -%}{%- for part in content -%}"
    "{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}{{- text(messages[0].content) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- elif messages and messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' and loop.first -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message.content -%}{{- text(message.content) -}}{%- endif -%}"
    "{%- if message.tool_calls -%}{%- for call in message.tool_calls -%}"
    "{%- if call.function is defined -%}{%- set call = call.function -%}{%- endif -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' -}}"
    "{%- if call.arguments is string -%}{{- call.arguments -}}{%- else -%}{{- call.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + text(message.content) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # The same signature and defaults as transformers' filter, so both environments print identical JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_compiled = None


def _template():
    global _compiled
    if _compiled is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson
        _compiled = env.from_string(CHAT_TEMPLATE)
    return _compiled


def render_chat(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """Render OpenAI-shaped messages (and tools) to the prompt text the models were trained on."""
    return _template().render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
