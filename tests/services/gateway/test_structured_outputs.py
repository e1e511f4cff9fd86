"""response_format and a forced tool_choice reach the verifier as the grammar of the request (what the verifier
masks the target with), and what cannot be honoured is a 400 before anything is queued."""

from __future__ import annotations

import llguidance

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
