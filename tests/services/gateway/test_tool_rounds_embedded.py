"""A server-side tool round end to end with the embedded pair (trained to call tools): the gateway, the real
verifier and the calculator in one process. The round continues on the KV the verifier held, so only the
continuation is prefilled; the answer is the one a fresh request on the whole conversation gets (greedy); usage.pte
has its parts and /metrics counts them. A hold that expires falls back to a fresh Generate with the same answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from specrelay.services.gateway import GatewayConfig, create_app
from specrelay.services.gateway.tool_rounds import ServerTools
from specrelay.services.toolcoord.tools import calculator as calculator_mod
from specrelay.services.toolcoord.tools.registry import Tool, ToolRegistry, builtin_registry
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import LocalBus
from specrelay.shared.pte import PteProfile
from specrelay.shared.tokenizer import Tokenizer

TARGET = Path(__file__).resolve().parents[3] / "models" / "target"
QUESTION = [{"role": "user", "content": "Use the calculator: what is 17 * 23?"}]
PROFILE = PteProfile(gamma=0.004, prefill_s_per_token=2e-4, decode_a_s=2e-3)


@contextlib.asynccontextmanager
async def stack(tmp_path, registry: ToolRegistry, hold_s: float = 30.0, prefix_caching: bool = True):
    from aiohttp.test_utils import TestClient, TestServer

    profile = tmp_path / "pte.json"
    PROFILE.save(profile)
    bus = LocalBus()
    verifier = VerifierService(VerifierConfig(str(TARGET), speculate=False, num_blocks=256, report_kv=False,
                                              prefix_caching=prefix_caching, pte_profile=str(profile)), bus)
    task = asyncio.create_task(verifier.run())
    tokenizer = Tokenizer(TARGET)
    config = GatewayConfig(model_name="target", max_model_len=4096, default_temperature=0.0, chunk_timeout_s=60)
    app = create_app(config, bus, tokenizer, server_tools=ServerTools(registry, registry, hold_s=hold_s))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client, verifier, tokenizer
    finally:
        await client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()


def calculator_only() -> ToolRegistry:
    """The model was trained with a calculator among other tools; given python as well it reaches for a
    `run_python` it knows from training, so the test offers the calculator alone."""
    return builtin_registry({"python": False})


async def ask(client, messages, **extra) -> dict:
    response = await client.post("/v1/chat/completions", json={"model": "target", "messages": messages,
                                                               "max_tokens": 60, **extra})
    assert response.status == 200, await response.text()
    return await response.json()


def conversation(message: dict) -> list[dict]:
    """The whole conversation after the round, as a client would send it fresh."""
    [ran] = message["server_tool_calls"]
    call = {k: ran[k] for k in ("id", "type", "function")}
    return [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": ran["id"], "content": ran["output"]}]


async def test_a_round_continues_on_the_held_kv_and_equals_a_fresh_request(tmp_path):
    async with stack(tmp_path, calculator_only()) as (client, verifier, tokenizer):
        engine = verifier.engine
        before = engine.num_prefilled_tokens
        data = await ask(client, QUESTION)
        prefilled = engine.num_prefilled_tokens - before
        message, usage = data["choices"][0]["message"], data["usage"]
        [ran] = message["server_tool_calls"]
        assert ran["function"]["name"] == "calculator" and not ran["is_error"]
        expression = json.loads(ran["function"]["arguments"])["expression"]
        assert ran["output"] == calculator_mod.calculator(expression)
        assert usage["tool_rounds"] == 1 and message["content"] and "tool_calls" not in message
        assert data["choices"][0]["finish_reason"] == "stop"

        # The prefill count: the prompt once, then only the continuation (tool answer + template markers).
        tools = calculator_only().schemas()
        prompt_ids = tokenizer.encode(tokenizer.render_chat(QUESTION, tools))
        fresh_ids = tokenizer.encode(tokenizer.render_chat(conversation(message), tools))
        answer_tokens = len(tokenizer.encode(message["content"])) + 1  # the second turn, its stop token included
        call_tokens = usage["completion_tokens"] - answer_tokens - 1  # the first turn, less its unfed stop token
        continuation = len(fresh_ids) - len(prompt_ids) - call_tokens  # tool answer + the template's markers
        assert 0 < continuation < 40
        assert prefilled == len(prompt_ids) + continuation  # not len(prompt_ids) + len(fresh_ids)
        assert usage["prompt_tokens"] == prefilled  # every token fed once
        pte = usage["pte"]
        assert pte["turns"] == 2 and pte["source"] == "file" and pte["recompute"] == 0
        assert pte["prefill"] == prefilled and pte["decode"] > 0
        assert pte["total"] == pytest.approx(pte["prefill"] + pte["decode"])
        assert pte["tool_response_tokens"] > 0
        assert pte["full_eviction_total"] > pte["total"]  # the paper's figure prefills the whole context twice

        # Lossless: a fresh request on the whole conversation answers the same, token for token.
        before = engine.num_prefilled_tokens
        fresh = await ask(client, conversation(message))
        assert fresh["choices"][0]["message"]["content"] == message["content"]
        assert fresh["usage"]["prompt_tokens"] == len(fresh_ids)
        assert "server_tool_calls" not in fresh["choices"][0]["message"]

        # /metrics counts PTE by part
        metrics = await (await client.get("/metrics")).text()
    totals = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("specrelay_pte_total{")}
    assert totals['part="total"'] == pytest.approx(pte["total"] + fresh["usage"]["pte"]["total"], rel=1e-6)
    assert totals['part="prefill"'] > 0 and totals['part="decode"'] > 0


async def test_streamed_round_shows_no_server_call_as_a_client_tool_call(tmp_path):
    async with stack(tmp_path, calculator_only()) as (client, _, _):
        whole = await ask(client, QUESTION)
        response = await client.post("/v1/chat/completions", json={
            "model": "target", "messages": QUESTION, "max_tokens": 60, "stream": True,
            "stream_options": {"include_usage": True}})
        text = await response.text()
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any("tool_calls" in d for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["tool_rounds"] == 1 and chunks[-1]["usage"]["pte"]["turns"] == 2


async def test_an_expired_hold_falls_back_to_a_fresh_generate_with_the_same_answer(tmp_path):
    async def slow_calculator(expression: str):
        await asyncio.sleep(1.0)  # longer than the hold below: the verifier frees the KV meanwhile
        return calculator_mod.calculator(expression)

    slow = ToolRegistry()
    slow.register(Tool("calculator", calculator_mod.DESCRIPTION, calculator_mod.SCHEMA, slow_calculator))
    async with stack(tmp_path, calculator_only(), prefix_caching=False) as (client, _, _):
        held = await ask(client, QUESTION)
        held_metrics = await (await client.get("/metrics")).text()
    async with stack(tmp_path, slow, hold_s=0.05, prefix_caching=False) as (client, verifier, tokenizer):
        data = await ask(client, QUESTION)
        assert len(verifier.held) == 0 and verifier.engine.runner.cache.num_free_blocks == 256
        metrics = await (await client.get("/metrics")).text()
    message, usage = data["choices"][0]["message"], data["usage"]
    assert message["content"] == held["choices"][0]["message"]["content"]
    assert usage["tool_rounds"] == 1
    # No KV survived the pause: the context before the tool answer was prefilled again, as recompute.
    prompt_ids = tokenizer.encode(tokenizer.render_chat(QUESTION, slow.schemas()))
    pte = usage["pte"]
    assert pte["turns"] == 2 and pte["recompute"] > len(prompt_ids)
    assert pte["total"] > held["usage"]["pte"]["total"] + len(prompt_ids) * 0.9
    # The calculator's answer is counted once, whether it went in a Continue or in the fresh Generate's prompt.
    assert pte["tool_response_tokens"] == held["usage"]["pte"]["tool_response_tokens"] > 0
    for text, fallbacks in ((held_metrics, 0), (metrics, 1)):
        assert "specrelay_tool_rounds_total 1.0\n" in text
        assert 'specrelay_server_tool_calls_total{outcome="ok",tool="calculator"} 1.0\n' in text
        assert ('specrelay_tool_fallbacks_total{reason="continue_error"} 1.0\n' in text) == bool(fallbacks)
