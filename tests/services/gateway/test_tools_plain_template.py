"""Tools on a model whose chat template has no tools section (SmolLM2's ChatML), over HTTP in front of the fake
verifier: the schemas, the earlier calls and the tool answers reach the verifier in the prompt, the reply's
`<tool_call>` comes back as `tool_calls`, and OpenAI's other content shapes (null with tool_calls, text parts)
are answered, not refused."""

from __future__ import annotations

import json
import shutil

import pytest

from specrelay.shared.tokenizer import Tokenizer

from .conftest import MODEL, WEATHER_TOOL, serve_gateway

# SmolLM2-135M-Instruct's template, as shipped in its GGUF (tests/shared/test_tool_prompt.py checks it is).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer_dir, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("smollm2-template")
    shutil.copy(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()) | {"chat_template": SMOLLM2_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(path)
    assert not tok.renders_tools
    return tok


@pytest.fixture
async def gateway(plain_tokenizer, base_config):
    async with serve_gateway(plain_tokenizer, base_config) as harness:
        yield harness


async def test_tools_reach_the_verifier_and_the_call_comes_back(gateway, plain_tokenizer):
    response = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [WEATHER_TOOL]})
    assert response.status == 200
    prompt = plain_tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    tools_block = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert prompt.startswith("<|im_start|>system\n# Tools\n") and json.loads(tools_block) == WEATHER_TOOL
    choice = (await response.json())["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


async def test_a_conversation_with_calls_null_content_and_text_parts_is_answered(gateway, plain_tokenizer):
    """The second turn of a client tool round as the OpenAI SDK sends it; on SmolLM2 this was a 400 and a 500."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What's the weather "},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C and sunny"}]},
    ]
    response = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "tools": [WEATHER_TOOL]})
    assert response.status == 200, await response.text()
    prompt = plain_tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    assert "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>" in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>") in prompt
    assert prompt.endswith("<|im_start|>user\n<tool_response>\n18C and sunny\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
    message = (await response.json())["choices"][0]["message"]
    assert message["content"] == "The weather in Paris: 18C and sunny."


async def test_required_tool_choice_forces_a_hermes_call(gateway, plain_tokenizer):
    response = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "tools": [WEATHER_TOOL],
        "tool_choice": "required"})
    prompt = plain_tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    assert "<tools>" in prompt and prompt.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "')
    [call] = (await response.json())["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"


@pytest.mark.slow
async def test_smollm2_is_served_a_tool_conversation_with_the_tools_in_its_prompt():
    """The real default model through the real verifier, one short greedy request: the second turn of a tool round
    (null content with tool_calls, text parts) is answered, and the prompt the verifier ran is the Hermes render."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from specrelay.models.resolve import DEFAULT_MODEL, resolve_model
    from specrelay.services.gateway import GatewayConfig, create_app
    from specrelay.services.verifier.service import VerifierConfig, VerifierService
    from specrelay.shared.bus import LocalBus

    model_dir = resolve_model(DEFAULT_MODEL)
    tokenizer = Tokenizer(model_dir)
    assert not tokenizer.renders_tools
    bus = LocalBus()
    verifier = VerifierService(VerifierConfig(str(model_dir), speculate=False, num_blocks=64, report_kv=False), bus)
    task = asyncio.create_task(verifier.run())
    app = create_app(GatewayConfig(model_name=DEFAULT_MODEL, max_model_len=2048, default_temperature=0.0,
                                   chunk_timeout_s=120), bus, tokenizer)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What's the weather in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "-3 C, snow"}]},
    ]
    try:
        response = await client.post("/v1/chat/completions", json={
            "model": DEFAULT_MODEL, "messages": messages, "tools": [WEATHER_TOOL], "max_tokens": 4})
        assert response.status == 200, await response.text()
        body = await response.json()
    finally:
        await client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
    with_tools = tokenizer.encode(tokenizer.render_chat(messages, [WEATHER_TOOL]))
    assert body["usage"]["prompt_tokens"] == len(with_tools)
    assert len(with_tools) > len(tokenizer.encode(tokenizer.render_chat(messages))) + 50  # the schemas are in it
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"] in ("stop", "length")
