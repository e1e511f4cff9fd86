"""langchain-openai's `with_structured_output` against a live `specrelay serve` on the small pair: with
method="json_schema" (response_format) and method="function_calling" (a forced named tool), the reply is always
the object the client asked for, whatever the pair would have written unconstrained."""

from __future__ import annotations

import jsonschema
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from .conftest import ASK_WEATHER


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=24)
    temperature_c: int = Field(ge=-50, le=60)
    sunny: bool


@pytest.fixture
def llm(server_url, model_name) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server_url}/v1", api_key="unused", model=model_name, temperature=0.0,
                      max_tokens=80, max_retries=0, timeout=60)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_schema_s_object(llm, method):
    structured = llm.with_structured_output(Weather, method=method, include_raw=True)
    for question in (ASK_WEATHER, "Is it sunny in Oslo?", "Hello"):
        reply = structured.invoke(question)
        assert reply["parsing_error"] is None, reply["raw"]
        weather = reply["parsed"]
        assert isinstance(weather, Weather)
        jsonschema.validate(weather.model_dump(), Weather.model_json_schema())
