"""The `openai` SDK against a live `specrelay serve`: chat, a streamed chat and the Responses API, parsed into the
SDK's own types without an error. The small pair may or may not call the tool: a call must parse, text must be text."""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import ASK_WEATHER, WEATHER_TOOL

GREEDY = {"temperature": 0.0}
RESPONSES_TOOL = {"type": "function", **WEATHER_TOOL["function"]}


@pytest.fixture
def client(server_url):
    with openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_chat_and_stream_with_a_tool(client, model_name):
    reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": ASK_WEATHER}],
                                           tools=[WEATHER_TOOL], max_tokens=40, **GREEDY)
    [choice] = reply.choices
    if choice.finish_reason == "tool_calls":
        assert isinstance(json.loads(choice.message.tool_calls[0].function.arguments), dict)
    else:
        assert isinstance(choice.message.content, str)
    stream = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=12, stream=True, stream_options={"include_usage": True},
                                            **GREEDY)
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_responses_plain_and_streamed(client, model_name):
    response = client.responses.create(model=model_name, input=ASK_WEATHER, tools=[RESPONSES_TOOL],
                                       max_output_tokens=40, **GREEDY)
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens > 0
    for item in response.output:
        if item.type == "function_call":
            assert item.name == "get_weather" and isinstance(json.loads(item.arguments), dict)
        else:
            assert item.type == "message" and response.output_text
    # 12 tokens end the reply: the stream ends with response.incomplete (the SDK's stream() helper waits for
    # response.completed only, with OpenAI too), so the events are read as they come
    events = list(client.responses.create(model=model_name, input="Hello", max_output_tokens=12, stream=True,
                                          **GREEDY))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text and final.usage.output_tokens == 12


def test_refusals_reach_the_sdk_as_bad_request_errors(client, model_name):
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=model_name, input="Hi", previous_response_id="resp_1")
    assert error.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_name, prompt="Hi", best_of=2)
    assert error.value.param == "best_of"


def test_ignore_eos_generates_to_max_tokens(client, model_name):
    """vLLM's `ignore_eos`, as benchmark clients send it: the model's end-of-turn token does not end the reply."""
    messages = [{"role": "user", "content": "Hi"}]
    plain = client.chat.completions.create(model=model_name, messages=messages, max_tokens=48, **GREEDY)
    assert plain.choices[0].finish_reason == "stop"  # the pair ends this turn by itself
    forced = client.chat.completions.create(model=model_name, messages=messages, max_tokens=48, **GREEDY,
                                            extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 48
