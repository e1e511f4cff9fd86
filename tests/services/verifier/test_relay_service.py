"""Relay through the real verifier service: agent A's request finishes and its output's decode-phase K/V is
published; agent B's request quotes that output after a prefix of its own, and B's usage says how much was reused.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import msgspec
import pytest
import torch

from specrelay.services.verifier.relay import RelayConfig
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import make_bus
from specrelay.shared.messages import GENERATE_STREAM, Generate, SamplingSpec, TokenChunk

from ...conftest import save_tiny_llama

# A samples (a random model's greedy output soon repeats itself, and a repeating span has no content-defined
# chunks to find); B decodes greedily so that two services can be compared token for token.
AGENT_A = SamplingSpec(temperature=1.0, seed=7, max_tokens=90)
AGENT_B = SamplingSpec(max_tokens=12)  # shorter than a publishable span (16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("relay-service"), seed=23, num_hidden_layers=3))


def config(model_dir: str, **overrides) -> VerifierConfig:
    return replace(VerifierConfig(model_dir, speculate=False, num_blocks=128, report_kv=False), **overrides)


async def ask(bus, channel, request_id: str, prompt: list[int], sampling: SamplingSpec) -> tuple[list[int], object]:
    """One request through the bus; its tokens and the usage on its last chunk."""
    await bus.publish(GENERATE_STREAM, Generate(request_id, prompt, sampling, channel.name))
    tokens: list[int] = []
    while True:
        chunk: TokenChunk = await asyncio.wait_for(channel.get(), 60)
        assert chunk.request_id == request_id and chunk.error is None, chunk
        tokens[chunk.offset :] = chunk.token_ids
        if chunk.finish_reason is not None:
            return tokens, chunk.usage


async def pipeline(cfg: VerifierConfig) -> tuple[list[int], object, list[int], object, VerifierService]:
    """A writes; B quotes A's output between instructions of its own (row 30 of its prompt, not a prefix)."""
    async with make_bus(None) as bus:
        service = VerifierService(cfg, bus)
        task = asyncio.create_task(service.run())
        try:
            channel = bus.open_reply_channel(TokenChunk)
            prompt_a = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(1)).tolist()
            out_a, usage_a = await ask(bus, channel, "agent-a", prompt_a, AGENT_A)
            prompt_b = [3, 1, 4, 1, 5, 9] * 5 + out_a + [2, 7, 1, 8]
            out_b, usage_b = await ask(bus, channel, "agent-b", prompt_b, AGENT_B)
            assert service.engine.runner.cache.num_free_blocks == cfg.num_blocks  # published, then freed
            return out_a, usage_a, out_b, usage_b, service
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


RELAY_ON = RelayConfig(enabled=True)


async def test_a_later_request_reuses_what_an_earlier_one_decoded(model_dir):
    out_a, usage_a, out_b, usage_b, service = await pipeline(config(model_dir, relay=RELAY_ON))
    assert len(out_a) == 90 and usage_a.relay is None  # A quoted nothing
    # A's last token has no K/V yet when A finishes: the other 89 are published and found in B's prompt
    assert usage_b.relay is not None and usage_b.relay.span_tokens == 89
    assert usage_b.relay.reused_tokens > 0.5 * 89
    assert usage_b.relay.reused_tokens + usage_b.relay.recomputed_tokens == 89
    assert usage_b.cached_tokens == 0 and usage_b.prompt_tokens == 30 + 90 + 4
    assert len(out_b) == 12
    counters = service.relay.counters
    assert (counters.spans_published, counters.tokens_published) == (1, 89)
    assert counters.requests_relayed == 1 and counters.reused_tokens == usage_b.relay.reused_tokens


async def test_full_recompute_answers_like_relay_off_and_relay_off_reports_nothing(model_dir):
    *_, out_off, usage_off, _ = await pipeline(config(model_dir, relay=RelayConfig(enabled=False)))
    assert usage_off.relay is None
    *_, out_exact, usage_exact, _ = await pipeline(
        config(model_dir, relay=RelayConfig(enabled=True, method="cacheblend", recompute_ratio=1.0)))
    assert usage_exact.relay.span_tokens == 89 and usage_exact.relay.reused_tokens == 0
    assert out_exact == out_off  # recomputing every relayed token is a full prefill: the same greedy answer


async def test_relay_is_off_unless_asked_for(model_dir):
    """The default verifier reuses exact prefixes only: B's quote of A's answer is prefilled as usual."""
    *_, usage_default, service = await pipeline(config(model_dir))
    assert usage_default.relay is None and service.relay is None and service.prefix is not None


async def test_an_answer_held_for_a_tool_round_is_quotable_at_once(model_dir):
    """A turn whose KV is held for a Continue (hold_s) publishes its span when it finishes, not when released."""
    async with make_bus(None) as bus:
        service = VerifierService(config(model_dir, relay=RELAY_ON), bus)
        task = asyncio.create_task(service.run())
        try:
            channel = bus.open_reply_channel(TokenChunk)
            prompt_a = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(1)).tolist()
            free, _ = await ask(bus, channel, "free-a", prompt_a, AGENT_A)
            # a stop token that first shows up late in that answer: the same sampling then stops there
            stop = next(t for i, t in enumerate(free) if i >= 50 and t not in free[:i])
            sampling = msgspec.structs.replace(AGENT_A, stop_token_ids=[stop])
            await bus.publish(GENERATE_STREAM, Generate("held-a", prompt_a, sampling, channel.name, hold_s=30.0))
            out_a: list[int] = []
            while (chunk := await asyncio.wait_for(channel.get(), 60)).finish_reason is None:
                out_a += chunk.token_ids
            out_a += chunk.token_ids
            assert chunk.finish_reason == "stop" and chunk.holder is not None  # held: its KV is not released
            assert out_a == free[: len(out_a)] and len(out_a) > 50
            assert service.relay.counters.spans_published == 2  # free-a's, and held-a's while held
            _, usage_b = await ask(bus, channel, "agent-b", [3, 1, 4, 1, 5, 9] * 5 + out_a, AGENT_B)
            assert usage_b.relay is not None and usage_b.relay.reused_tokens > 0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
