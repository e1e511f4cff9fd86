"""Relay as a client of `specrelay serve` sees it: the embedded target behind the OpenAI API in this process. Agent
A's answer is pasted as text into agent B's message (re-tokenized by the gateway, not passed as ids), and B's
response carries `usage.relay`; /metrics counts it."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer

from specrelay.models.resolve import PAIR_DIR
from specrelay.services.gateway import GatewayConfig, create_app
from specrelay.services.verifier.relay import RelayConfig
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import LocalBus
from specrelay.shared.tokenizer import Tokenizer

TARGET = PAIR_DIR / "target"
pytestmark = pytest.mark.skipif(not (TARGET / "config.json").is_file(), reason="the embedded pair is not trained")


async def test_agent_b_quoting_agent_a_gets_usage_relay_over_http():
    bus = LocalBus()
    verifier = VerifierService(VerifierConfig(str(TARGET), speculate=False, num_blocks=128, report_kv=False,
                                              relay=RelayConfig(enabled=True)), bus)
    task = asyncio.create_task(verifier.run())
    app = create_app(GatewayConfig(model_name="target", max_model_len=1024, chunk_timeout_s=60.0), bus,
                     Tokenizer(TARGET))
    try:
        async with TestClient(TestServer(app)) as client:
            async def chat(content: str, **sampling) -> dict:
                response = await client.post("/v1/chat/completions", json={
                    "model": "target", "messages": [{"role": "user", "content": content}], **sampling})
                assert response.status == 200, await response.text()
                return await response.json()

            # agent A writes notes (a sampled completion: the chat-tuned model's chat answers are too short to index)
            response = await client.post("/v1/completions", json={
                "model": "target", "prompt": "The worker wrote:\n", "max_tokens": 120, "temperature": 1.0, "seed": 1,
                "ignore_eos": True})  # a long note whatever the seed draws (seeded draws are positional since 1c4109c)
            assert response.status == 200, await response.text()
            notes = await response.json()
            text = notes["choices"][0]["text"]
            assert notes["usage"]["completion_tokens"] >= 64 and "relay" not in notes["usage"]
            # agent B gets them pasted into its message, after instructions of its own
            work = await chat(f'The worker wrote:\n"""\n{text}\n"""\nReview the worker\'s output.', max_tokens=4)
            relay = work["usage"]["relay"]
            assert relay["span_tokens"] >= 64 and relay["reused_tokens"] > relay["span_tokens"] // 2
            assert relay["reused_tokens"] + relay["recomputed_tokens"] == relay["span_tokens"]
            metrics = await (await client.get("/metrics")).text()
            counted = re.search(r"^specrelay_relay_reused_tokens_total (\d+)", metrics, re.M)
            assert counted and int(counted.group(1)) == relay["reused_tokens"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
