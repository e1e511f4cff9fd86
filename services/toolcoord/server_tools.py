"""A server-side tool round inside one request: run the calls, trim the answers, and build the text the verifier
appends to the sequence so that generation continues on the KV it already holds (no second prefill).

The continuation is derived from the chat template itself rather than written by hand: render the conversation
with the assistant's calls and the tool answers, and take what comes after the text the KV already covers
(prompt + generated text). When the model wrote its call exactly as the template renders one, the sequence after
the continuation is token for token the prompt a fresh request would send, so later requests still find it by
prefix (`Continuation.exact`). When the model's spelling differs (spacing, key order), its own text stays in the
KV and the continuation starts at the template's end-of-turn after the last call; `exact` is then False and the
verifier should not publish that sequence under the canonical prefix.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

from specrelay.services.toolcoord.parser import TOOL_CALL_END
from specrelay.services.toolcoord.toolcalls import ParsedOutput, ToolCall
from specrelay.services.toolcoord.tools.base import ToolResult
from specrelay.services.toolcoord.tools.registry import ToolRegistry
from specrelay.services.toolcoord.trim import TokenizerLike, TrimConfig, TrimResult, trim_tool_response

# render(messages, tools, add_generation_prompt) -> prompt text, e.g. shared.tokenizer.Tokenizer.render_chat
RenderChat = Callable[..., str]


def split_calls(calls: Sequence[ToolCall], registry: ToolRegistry,
                client_tool_names: Collection[str]) -> tuple[list[ToolCall], list[ToolCall]]:
    """(server-side, client-side). A tool the request itself declares is the client's, even when the server has
    one of the same name: the client asked to run it."""
    server = [c for c in calls if c.name in registry and c.name not in client_tool_names]
    client = [c for c in calls if c not in server]
    return server, client


@dataclass(frozen=True)
class ToolOutcome:
    call: ToolCall
    result: ToolResult
    trim: TrimResult

    @property
    def content(self) -> str:
        return self.trim.text

    def tool_message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.call.id, "name": self.call.name, "content": self.content}


async def run_tool_calls(calls: Sequence[ToolCall], registry: ToolRegistry, tokenizer: TokenizerLike,
                         trim: TrimConfig) -> list[ToolOutcome]:
    """Run the calls side by side; every answer is trimmed to its tool's token limit."""
    results = await asyncio.gather(*(registry.call(c.name, c.arguments) for c in calls))
    return [ToolOutcome(c, r, trim_tool_response(r.content, tokenizer, trim.limit_for(c.name), trim.head_fraction))
            for c, r in zip(calls, results)]


@dataclass(frozen=True)
class Continuation:
    text: str  # append (tokenised) to the sequence and prefill only these tokens
    exact: bool  # the sequence now equals a fresh render of the conversation
    messages: list[dict[str, Any]]  # the conversation including the assistant's calls and the tool answers
    tool_response_tokens: int  # tokens of the (trimmed) answers, for usage.pte
    trimmed_tokens: int  # tokens cut from the answers by trimming, for usage


def build_continuation(render: RenderChat, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                       generated_text: str, parsed: ParsedOutput, outcomes: Sequence[ToolOutcome]) -> Continuation:
    """`generated_text` is the assistant text whose KV exists (without the end-of-turn token if that was only
    sampled, not fed through the model)."""
    assistant = {"role": "assistant", "content": parsed.content or None,
                 "tool_calls": [o.call.to_openai() for o in outcomes]}
    full = [*messages, assistant, *(o.tool_message() for o in outcomes)]
    covered = render(messages, tools=tools, add_generation_prompt=True) + generated_text
    after = render(full, tools=tools, add_generation_prompt=True)
    tool_tokens = sum(o.trim.kept_tokens for o in outcomes)
    trimmed = sum(o.trim.trimmed_tokens for o in outcomes)
    if after.startswith(covered):
        return Continuation(after[len(covered):], True, full, tool_tokens, trimmed)
    # The model spelled its call its own way: keep its text, continue from the template's end of the call turn.
    with_assistant = render([*messages, assistant], tools=tools, add_generation_prompt=False)
    cut = with_assistant.rfind(TOOL_CALL_END)
    turn_end = with_assistant[cut + len(TOOL_CALL_END):] if cut >= 0 else ""
    return Continuation(turn_end + after[len(with_assistant):], False, full, tool_tokens, trimmed)
