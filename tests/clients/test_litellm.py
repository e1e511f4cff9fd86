"""litellm against a live `specrelay serve` as an OpenAI-compatible provider: completion, a stream, and
`responses`."""

from __future__ import annotations

import os

import pytest

# litellm fetches its model price map from GitHub at import unless told to use the copy it ships
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm  # noqa: E402

from .conftest import ASK_WEATHER, WEATHER_TOOL  # noqa: E402


@pytest.fixture
def provider(server_url, model_name) -> dict:
    return {"model": f"openai/{model_name}", "api_base": f"{server_url}/v1", "api_key": "unused", "temperature": 0.0}


def test_completion_with_a_tool_and_a_stream(provider):
    reply = litellm.completion(messages=[{"role": "user", "content": ASK_WEATHER}], tools=[WEATHER_TOOL],
                               max_tokens=40, **provider)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert message.tool_calls or isinstance(message.content, str)
    assert reply.usage.completion_tokens > 0
    chunks = list(litellm.completion(messages=[{"role": "user", "content": "Hello"}], max_tokens=12, stream=True,
                                     **provider))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_responses(provider):
    response = litellm.responses(input="Hello", max_output_tokens=20, **provider)  # litellm raises < 16 to 16
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens == 20
    [item] = response.output
    assert item.type == "message" and item.content[0].text
