"""POST /v1/responses against the scripted fake verifier: what a Responses client reads, plain and streamed."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from specrelay.services.gateway.responses_input import ResponsesRequest

from .test_fuzz import HOSTILE, TEXT, from_schema, fuzz_settings, to_body

MODEL = "tiny-chat"  # conftest's
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Get the current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = "What's the weather in Paris?"


def sse_events(text: str) -> list[dict]:
    """`event: <type>` / `data: {...}` pairs; the event line must name the data's type."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


async def post(gateway, **body):
    return await gateway.client.post("/v1/responses", json={"model": MODEL, **body})


async def test_text_input_answers_one_message_with_usage(gateway, tokenizer):
    response = await post(gateway, input="Hello there", instructions="Be brief.", max_output_tokens=6)
    data = await response.json()
    assert response.status == 200, data
    assert data["object"] == "response" and data["store"] is False and data["model"] == MODEL
    assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": "max_output_tokens"}
    [item] = data["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "incomplete"
    [part] = item["content"]
    assert part["type"] == "output_text" and part["text"].startswith("Once upon")
    usage = data["usage"]
    assert usage["output_tokens"] == 6 and usage["total_tokens"] == usage["input_tokens"] + 6
    assert usage["input_tokens_details"]["cached_tokens"] == 8  # the fake's
    prompt = tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    assert prompt.index("Be brief.") < prompt.index("Hello there")  # instructions: the system turn


async def test_a_function_tool_round_trip(gateway, tokenizer):
    first = await (await post(gateway, input=ASK, tools=[WEATHER_TOOL])).json()
    assert first["status"] == "completed"
    [call] = first["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["call_id"]
    history = [{"role": "user", "content": ASK}, call,
               {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature": 18}'}]
    second = await (await post(gateway, input=history, tools=[WEATHER_TOOL])).json()
    assert second["output"][0]["content"][0]["text"] == 'The weather in Paris: {"temperature": 18}.'
    prompt = tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    assert '"name": "get_weather"' in prompt and "<tool_response>" in prompt  # the call went back as the model's


async def test_streamed_text_is_the_plain_answer_as_openai_events(gateway):
    plain = await (await post(gateway, input="Hello there", max_output_tokens=9)).json()
    events = sse_events(await (await post(gateway, input="Hello there", max_output_tokens=9, stream=True)).text())
    types = [e["type"] for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert text == final["output"][0]["content"][0]["text"] == plain["output"][0]["content"][0]["text"]
    assert final["usage"]["output_tokens"] == 9
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []


async def test_a_streamed_call_builds_its_arguments(gateway):
    events = sse_events(await (await post(gateway, input=ASK, tools=[WEATHER_TOOL], stream=True)).text())
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["item"]["type"] for e in added] == ["function_call"]  # the newline before the call opens no message
    pieces = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert pieces == done["arguments"] and json.loads(pieces) == {"city": "Paris"}
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["call_id"] == added[0]["item"]["call_id"]


async def test_a_malformed_call_is_reported_never_returned(gateway):
    data = await (await post(gateway, input="BROKEN weather", tools=[WEATHER_TOOL])).json()
    assert [item["type"] for item in data["output"]] == ["message"]
    assert data["output"][0]["content"][0]["text"].startswith("Let me look.")
    assert data["tool_call_errors"] and data["tool_call_errors"][0]["type"] == "tool_call_error"


async def test_a_failed_generation_ends_the_stream_with_response_failed(gateway):
    events = sse_events(await (await post(gateway, input="FAIL now", stream=True)).text())
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and "CUDA fell over" in events[-1]["response"]["error"][
        "message"]


REFUSED = [
    ("previous_response_id", {"previous_response_id": "resp_1"}),
    ("conversation", {"conversation": "conv_1"}),
    ("store", {"store": True}),
    ("background", {"background": True}),
    ("truncation", {"truncation": "auto"}),
    ("include", {"include": ["message.output_text.logprobs"]}),
    ("top_logprobs", {"top_logprobs": 3}),
    ("reasoning", {"reasoning": {"effort": "high"}}),
    ("text.format", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}),
    ("tools[0].type", {"tools": [{"type": "web_search"}]}),
    ("tool_choice", {"tool_choice": {"type": "web_search"}}),
    ("input[0].type", {"input": [{"type": "item_reference", "id": "msg_1"}]}),
    ("input[0].content[0].type", {"input": [{"role": "user", "content": [{"type": "input_image",
                                                                          "image_url": "http://x"}]}]}),
    ("input", {"input": []}),
    ("max_output_tokens", {"max_output_tokens": 0}),
    ("model", {"model": "gpt-9"}),
]


@pytest.mark.parametrize("param,body", REFUSED, ids=[r[0] for r in REFUSED])
async def test_what_a_stateless_server_cannot_honour_is_a_400_naming_it(gateway, param, body):
    response = await gateway.client.post("/v1/responses", json={"model": MODEL, "input": "Hi", **body})
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert not gateway.fake.generates


async def test_accepted_no_op_fields_are_echoed(gateway):
    data = await (await post(gateway, input="Hi", max_output_tokens=2, store=False, include=[], metadata={"k": "v"},
                             truncation="disabled", text={"format": {"type": "text"}}, reasoning={"effort": None},
                             tool_choice="none", tools=[WEATHER_TOOL], parallel_tool_calls=False)).json()
    assert data["metadata"] == {"k": "v"} and data["parallel_tool_calls"] is False and data["tool_choice"] == "none"
    assert data["tools"][0]["name"] == "get_weather"


# --- fuzzing: whatever a Responses client sends, never a 5xx, and the server keeps serving (test_fuzz.py's
# schema-driven strategies, with input items that are mostly well-formed) ---

def _responses_bodies():
    schema = msgspec.json.schema(ResponsesRequest)
    part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "refusal", "input_image"]),
                                  "text": TEXT})
    item = st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"])},
                              optional={"content": st.one_of(TEXT, st.lists(part, max_size=2), HOSTILE),
                                        "type": st.sampled_from(["message", "reasoning", None])}),
        st.fixed_dictionaries({"type": st.just("function_call"), "call_id": TEXT,
                               "name": st.sampled_from(["get_weather", "f f", ""]),
                               "arguments": st.sampled_from(['{"city": "Paris"}', "{", "3", ""])}),
        st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": TEXT,
                               "output": st.one_of(TEXT, st.lists(part, max_size=2), HOSTILE)}),
        HOSTILE)
    inputs = st.one_of(TEXT, st.lists(item, max_size=4))
    return from_schema(schema, schema["$defs"]).flatmap(
        lambda body: inputs.map(lambda value: to_body({**body, "input": value, "max_output_tokens": 8}
                                                      if "input" in body else body)))


@pytest.fixture
async def session():
    import aiohttp

    async with aiohttp.ClientSession() as s:
        yield s


@fuzz_settings(max_examples=200)
@given(body=_responses_bodies())
async def test_fuzzed_responses_requests_never_get_a_5xx(gateway, session, body):
    async with session.post(f"{gateway.url}/v1/responses", data=body,
                            headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        assert r.status < 500, f"{r.status} for {body[:300]!r}: {text[:500]}"
        if r.status >= 400:
            assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
        elif r.content_type == "text/event-stream":
            assert sse_events(text)[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
        else:
            assert json.loads(text)["object"] == "response"
    async with session.post(f"{gateway.url}/v1/responses", json={"model": MODEL, "input": "Hi",
                                                                 "max_output_tokens": 2}) as r:
        assert r.status == 200

