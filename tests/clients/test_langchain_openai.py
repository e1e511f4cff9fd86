"""langchain-openai's ChatOpenAI against a live `specrelay serve`: `bind_tools` and the tool round trip (the call
parsed into `AIMessage.tool_calls`, the result sent back as a `ToolMessage`), and a stream."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from .conftest import ASK_WEATHER


@tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f'{{"city": "{city}", "temperature": 18, "condition": "sunny"}}'


@pytest.fixture
def llm(server_url, model_name) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server_url}/v1", api_key="unused", model=model_name, temperature=0.0,
                      max_tokens=60, max_retries=0, timeout=60)


def test_bind_tools_round_trip(llm):
    bound = llm.bind_tools([get_weather])
    history = [HumanMessage(ASK_WEATHER)]
    reply = bound.invoke(history)
    assert not reply.invalid_tool_calls
    if not reply.tool_calls:  # the model answered in text
        assert isinstance(reply.content, str) and reply.content
        return
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"], dict) and call["id"]
    ok = isinstance(call["args"].get("city"), str)  # the pair may write other arguments: the error goes back
    result = get_weather.invoke(call["args"]) if ok else "error: the argument 'city' is required"
    history += [reply, ToolMessage(result, tool_call_id=call["id"])]
    final = bound.invoke(history)
    assert isinstance(final.content, str)
    assert final.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_stream(llm):
    chunks = list(llm.stream("Hello"))
    assert "".join(c.content for c in chunks)
    assert [c.response_metadata["finish_reason"] for c in chunks if "finish_reason" in c.response_metadata] in (
        ["stop"], ["length"])
