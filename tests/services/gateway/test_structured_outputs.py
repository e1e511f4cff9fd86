"""response_format and a forced tool_choice reach the verifier as the grammar of the request (what the verifier
masks the target with), and what cannot be honoured is a 400 before anything is queued."""

from __future__ import annotations

import json
import re

import llguidance

from .fake_verifier import REPEATED_CALLS
from .test_errors import TOOL, assert_error, body

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


async def _grammar(gateway, payload) -> str | None:
    response = await gateway.client.post("/v1/chat/completions", json=payload)
    assert response.status == 200, await response.text()
    return gateway.fake.generates[-1].sampling.grammar


async def test_json_schema_and_json_object_are_carried_as_grammars(gateway):
    grammar = await _grammar(gateway, body(response_format={"type": "json_schema",
                                                            "json_schema": {"name": "a", "schema": SCHEMA}}))
    assert '"answer"' in grammar and not llguidance.LLMatcher.validate_grammar(grammar)
    assert '"object"' in await _grammar(gateway, body(response_format={"type": "json_object"}))
    assert await _grammar(gateway, body(response_format={"type": "text"})) is None
    assert await _grammar(gateway, body()) is None


async def test_a_forced_tool_choice_carries_the_call_grammar_and_auto_none(gateway):
    named = {"type": "function", "function": {"name": "get_weather"}}
    grammar = await _grammar(gateway, body(tools=[TOOL], tool_choice=named, parallel_tool_calls=False))
    assert "get_weather" in grammar and "</tool_call>" in grammar
    assert await _grammar(gateway, body(tools=[TOOL], tool_choice="required")) is not None
    assert await _grammar(gateway, body(tools=[TOOL], tool_choice="auto")) is None


async def test_what_cannot_be_honoured_is_a_400(gateway):
    json_format = {"type": "json_object"}
    for payload, param in ((body(tools=[TOOL], response_format=json_format), "response_format"),
                           (body(response_format=json_format, ignore_eos=True), "ignore_eos"),
                           (body(response_format={"type": "json_schema", "json_schema": "x"}),
                            "response_format.json_schema")):
        await assert_error(await gateway.client.post("/v1/chat/completions", json=payload), 400, param)
    assert gateway.fake.generates == []


async def test_completions_take_response_format_too(gateway):
    response = await gateway.client.post("/v1/completions", json={
        "model": "tiny-chat", "prompt": "Answer in JSON:", "max_tokens": 8, "response_format": {"type": "json_object"}})
    assert response.status == 200, await response.text()
    assert '"object"' in gateway.fake.generates[-1].sampling.grammar


async def test_calls_cut_by_max_tokens_keep_the_complete_ones_and_finish_by_length(gateway, tokenizer):
    """A model that repeats a forced call until max_tokens (SmolLM2 with parallel calls allowed): the reply holds
    the complete calls, valid, not the one cut mid-arguments, and says it was cut."""
    third_city = [m.start() for m in re.finditer("Paris", REPEATED_CALLS)][2]
    two_and_a_half = REPEATED_CALLS[:third_city]  # two whole calls, the third cut inside its arguments
    payload = body(tools=[TOOL], tool_choice="required", max_tokens=len(tokenizer.encode(two_and_a_half)),
                   messages=[{"role": "user", "content": "REPEAT the weather in Paris"}])
    response = await gateway.client.post("/v1/chat/completions", json=payload)
    choice = (await response.json())["choices"][0]
    assert choice["finish_reason"] == "length", choice
    calls = choice["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}] * 2
    assert "tool_call_errors" not in choice["message"]
    streamed = await gateway.client.post("/v1/chat/completions", json={**payload, "stream": True})
    assert '"finish_reason": "length"' in (await streamed.text()).replace('":"', '": "')
