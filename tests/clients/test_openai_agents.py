"""openai-agents with a function tool against a live `specrelay serve`, through both of its OpenAI models: Chat
Completions and Responses (its default). Whatever the small pair answers, the SDK runs to a final output without an
error; when the model calls the tool, the SDK runs it and sends the result back for the final answer."""

from __future__ import annotations

import json

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from .conftest import ASK_WEATHER

set_tracing_disabled(True)  # no trace export to OpenAI's servers


def _agent(model, calls: list[str]) -> Agent:
    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city.

        Args:
            city: City name.
        """
        calls.append(city)
        return json.dumps({"city": city, "temperature": 18, "condition": "sunny"})

    return Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                 model=model, model_settings=ModelSettings(temperature=0.0, max_tokens=60))


@pytest.mark.parametrize("model_class", [OpenAIChatCompletionsModel, OpenAIResponsesModel])
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_an_agent_with_a_function_tool_runs_to_a_final_output(server_url, model_name, model_class, streamed):
    client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)
    calls: list[str] = []
    agent = _agent(model_class(model=model_name, openai_client=client), calls)
    config = RunConfig(tracing_disabled=True)
    if streamed:
        result = Runner.run_streamed(agent, ASK_WEATHER, max_turns=3, run_config=config)
        events = [event async for event in result.stream_events()]
        assert events
    else:
        result = await Runner.run(agent, ASK_WEATHER, max_turns=3, run_config=config)
    await client.close()
    first = result.raw_responses[0]
    called = [item for item in first.output if getattr(item, "type", None) == "function_call"]
    if called:  # a tool round trip: the SDK ran the tool with the model's arguments, then asked again
        assert len(result.raw_responses) >= 2  # the tool's result (or, for bad arguments, its error) went back
        city = json.loads(called[0].arguments).get("city")
        if isinstance(city, str):
            assert calls[0] == city
    else:
        assert not calls
    assert isinstance(result.final_output, str)
