"""Client-side tool calls end to end with the embedded target: the turn that calls the client's tool is held until
the gateway has parsed it, then handed to the verifier's retention policy with the tool's name; the client's next
request (the conversation with the tool's answer) finds the kept KV by prefix, and answers as a fresh request
does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from specrelay.services.gateway import GatewayConfig, create_app
from specrelay.services.toolcoord.tools import calculator as calculator_mod
from specrelay.services.toolcoord.tools.registry import builtin_registry
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import LocalBus
from specrelay.shared.pte import PteProfile
from specrelay.shared.tokenizer import Tokenizer

TARGET = Path(__file__).resolve().parents[3] / "models" / "target"
QUESTION = [{"role": "user", "content": "Use the calculator: what is 17 * 23?"}]
PROFILE = PteProfile(gamma=0.004, prefill_s_per_token=2e-4, decode_a_s=2e-3)
TOOLS = builtin_registry({"python": False}).schemas()  # offered by the client: the client runs them


@contextlib.asynccontextmanager
async def stack(tmp_path, **verifier_config):
    from aiohttp.test_utils import TestClient, TestServer

    profile = tmp_path / "pte.json"
    PROFILE.save(profile)
    bus = LocalBus()
    verifier = VerifierService(VerifierConfig(str(TARGET), speculate=False, num_blocks=256, report_kv=False,
                                              pte_profile=str(profile), **verifier_config), bus)
    task = asyncio.create_task(verifier.run())
    config = GatewayConfig(model_name="target", max_model_len=4096, default_temperature=0.0, chunk_timeout_s=60)
    client = TestClient(TestServer(create_app(config, bus, Tokenizer(TARGET)), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client, verifier
    finally:
        await client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()


async def ask(client, messages) -> dict:
    response = await client.post("/v1/chat/completions", json={"model": "target", "messages": messages,
                                                               "tools": TOOLS, "max_tokens": 60})
    assert response.status == 200, await response.text()
    return await response.json()


async def settled(verifier) -> None:
    for _ in range(200):
        if not len(verifier.held):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the held turn was never released")


def with_answer(message: dict) -> list[dict]:
    [call] = message["tool_calls"]
    expression = json.loads(call["function"]["arguments"])["expression"]
    return [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": calculator_mod.calculator(expression)}]


async def test_the_next_request_after_a_client_tool_call_finds_the_kept_kv(tmp_path):
    # No kvstore: every cached token of the second request comes from the table the policy kept.
    async with stack(tmp_path, prefix_caching=False) as (client, verifier):
        first = await ask(client, QUESTION)
        assert first["choices"][0]["finish_reason"] == "tool_calls"
        await settled(verifier)
        [paused] = verifier.retention.paused.values()
        assert paused.tool_names == ("calculator",) and paused.req is not None  # kept on the device

        second = await ask(client, with_answer(first["choices"][0]["message"]))
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= first["usage"]["prompt_tokens"]  # at least the whole first prompt was not prefilled again
        assert verifier.retention.paused == {} and verifier.retention.policy.pauses.stats["calculator"].count == 1
        await settled(verifier)
        assert verifier.engine.runner.cache.num_free_blocks == 256

        # Lossless: the same conversation sent to a server that kept nothing answers the same.
    async with stack(tmp_path, prefix_caching=False, client_retention=False) as (client, verifier):
        fresh = await ask(client, with_answer(first["choices"][0]["message"]))
        assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert fresh["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert fresh["choices"][0]["finish_reason"] == second["choices"][0]["finish_reason"] == "stop"


async def test_a_turn_without_client_calls_is_released_as_before(tmp_path):
    async with stack(tmp_path, prefix_caching=False) as (client, verifier):
        data = await ask(client, [{"role": "user", "content": "Say hello."}])
        await settled(verifier)
        # The small model answers with a call to a tool it was trained on but was not offered: an error, no call.
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        assert verifier.retention.paused == {}
        assert verifier.engine.runner.cache.num_free_blocks == 256
