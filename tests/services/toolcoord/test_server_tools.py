"""A server-side tool round: calls run, answers trimmed, and the continuation extends the KV the request already
holds, so only the new tokens are prefilled."""

from __future__ import annotations

import json

import pytest

from specrelay.models.chat_template import render_chat
from specrelay.services.toolcoord.parser import parse_tool_calls
from specrelay.services.toolcoord.server_tools import build_continuation, run_tool_calls, split_calls
from specrelay.services.toolcoord.tools.registry import builtin_registry
from specrelay.services.toolcoord.trim import TrimConfig
from specrelay.shared.pte import PteProfile, TurnTokens, trajectory_pte


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "arithmetic",
                                           "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "python", "description": "run code",
                                           "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "system", "content": "You are a careful assistant. " * 20},
            {"role": "user", "content": "What is 6*7, and print 'x' 5000 times?"}]
GENERATED = ('Let me check.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "python", "arguments": {"code": "print(\'x\' * 5000)"}}\n</tool_call>')


async def test_round_trip_continues_on_the_kept_kv_with_no_second_prefill():
    tok = ByteTokenizer()
    parsed = parse_tool_calls(GENERATED, tool_names={"calculator", "python"})
    server, client = split_calls(parsed.tool_calls, builtin_registry(), client_tool_names=set())
    assert [c.name for c in server] == ["calculator", "python"] and client == []
    outcomes = await run_tool_calls(server, builtin_registry(), tok, TrimConfig(default_max_tokens=256))
    assert outcomes[0].content == "42"
    assert outcomes[1].trim.trimmed_tokens > 4000 and outcomes[1].trim.kept_tokens <= 256
    cont = build_continuation(render_chat, MESSAGES, TOOLS, GENERATED, parsed, outcomes)

    # The verifier's sequence: the first turn's prompt and the generated tokens, whose KV it keeps ...
    kv_tokens = tok.encode(render_chat(MESSAGES, tools=TOOLS, add_generation_prompt=True) + GENERATED)
    new_tokens = tok.encode(cont.text)
    # ... extended by the continuation is exactly what a fresh request for the next turn would prefill.
    fresh_prompt = tok.encode(render_chat(cont.messages, tools=TOOLS, add_generation_prompt=True))
    assert cont.exact and kv_tokens + new_tokens == fresh_prompt
    assert cont.text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>")
    assert cont.text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # Prefill in the second round is the continuation only: the tool answers and the template's few markers.
    assert len(new_tokens) < 400 < len(kv_tokens)
    assert cont.tool_response_tokens == 2 + outcomes[1].trim.kept_tokens
    assert cont.trimmed_tokens == outcomes[1].trim.trimmed_tokens

    profile = PteProfile(gamma=0.01, prefill_s_per_token=1e-4)
    usage = trajectory_pte(profile, [
        TurnTokens(prefilled_tokens=len(kv_tokens) - len(tok.encode(GENERATED)),
                   decode_tokens=len(tok.encode(GENERATED))),
        TurnTokens(prefilled_tokens=len(new_tokens), cached_tokens=len(kv_tokens), decode_tokens=10,
                   tool_response_tokens=cont.tool_response_tokens)])
    assert usage.recompute == 0 and usage.prefill == len(fresh_prompt) - len(tok.encode(GENERATED))
    assert usage.full_eviction_total - usage.total == pytest.approx(len(kv_tokens))  # what the paper's model would recompute


async def test_a_call_spelled_differently_still_continues_in_place():
    generated = '<tool_call>{"arguments": {"expression": "1+1"}, "name": "calculator"}</tool_call>'
    parsed = parse_tool_calls(generated)
    outcomes = await run_tool_calls(parsed.tool_calls, builtin_registry(), ByteTokenizer(), TrimConfig())
    cont = build_continuation(render_chat, MESSAGES, TOOLS, generated, parsed, outcomes)
    assert not cont.exact
    assert cont.text == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_client_declared_tools_stay_with_the_client():
    parsed = parse_tool_calls(GENERATED + '<tool_call>{"name": "lookup", "arguments": {}}</tool_call>')
    server, client = split_calls(parsed.tool_calls, builtin_registry(), client_tool_names={"python", "lookup"})
    assert [c.name for c in server] == ["calculator"] and [c.name for c in client] == ["python", "lookup"]
    assert json.loads(client[0].arguments) == {"code": "print('x' * 5000)"}
