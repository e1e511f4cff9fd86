"""The verifier and drafter services over the bus produce the in-process engine's greedy output."""

import asyncio

import pytest
import torch

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.service import Drafter, serve_drafter
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import BusConfig, make_bus
from specrelay.shared.messages import CANCEL_STREAM, GENERATE_STREAM, Cancel, Generate, SamplingSpec, TokenChunk
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams


async def collect(channel, until_finished: int) -> dict[str, list[TokenChunk]]:
    chunks: dict[str, list[TokenChunk]] = {}
    done = 0
    while done < until_finished:
        chunk = await asyncio.wait_for(channel.get(), 60)
        chunks.setdefault(chunk.request_id, []).append(chunk)
        done += chunk.finish_reason is not None
    return chunks


async def run_stack(bus, target, draft, body):
    service = VerifierService(VerifierConfig(model_dir="", max_nodes=8, num_blocks=256), bus,
                              engine=_engine(target))
    drafter = Drafter(DraftModelProposer(ModelRunner(draft, num_blocks=512), max_depth=4, branch=2, width=2))
    tasks = [asyncio.create_task(service.run()), asyncio.create_task(serve_drafter(bus, drafter, "d0"))]
    try:
        return await body(service)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _engine(target):
    from specrelay.services.verifier.engine import SpecEngine

    return SpecEngine(ModelRunner(target, num_blocks=256), proposer=None, max_nodes=8, speculate=True)


@pytest.mark.parametrize("transport", ["local", "redis"])
async def test_greedy_over_the_bus_equals_the_engine(transport, tiny_pair, redis_url, redis_prefix):
    target, draft = tiny_pair
    prompts = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 19, 33)]
    expected = ModelRunner(target, num_blocks=128).generate(prompts, SamplingParams(max_tokens=40))
    bus = make_bus(redis_url if transport == "redis" else None, BusConfig(prefix=redis_prefix, block_ms=20))

    async def body(service):
        channel = bus.open_reply_channel(TokenChunk)
        for i, p in enumerate(prompts):
            await bus.publish(GENERATE_STREAM, Generate(f"r{i}", p, SamplingSpec(max_tokens=40), channel.name))
        chunks = await collect(channel, len(prompts))
        for i, want in enumerate(expected):
            got = [t for c in chunks[f"r{i}"] for t in c.token_ids]
            assert got == want
            assert chunks[f"r{i}"][-1].finish_reason == "length"
            assert chunks[f"r{i}"][-1].usage.completion_tokens == 40
        assert sum(c[-1].usage.accepted_tokens for c in chunks.values()) > 0  # the drafter was used
        assert service.engine.runner.cache.num_free_blocks == 256

    async with bus:
        await run_stack(bus, target, draft, body)


async def test_cancel_frees_the_kv_and_bad_requests_get_an_error(tiny_pair):
    target, draft = tiny_pair
    bus = make_bus(None)

    async def body(service):
        channel = bus.open_reply_channel(TokenChunk)
        await bus.publish(GENERATE_STREAM, Generate("long", [1, 2, 3], SamplingSpec(max_tokens=500), channel.name))
        first = await asyncio.wait_for(channel.get(), 60)
        assert first.request_id == "long" and first.finish_reason is None
        assert service.engine.runner.cache.num_free_blocks < 256
        await bus.publish(CANCEL_STREAM, Cancel("long"))
        while (chunk := await asyncio.wait_for(channel.get(), 60)).finish_reason is None:
            pass
        assert chunk.finish_reason == "cancelled"
        await asyncio.sleep(0.05)
        assert service.engine.runner.cache.num_free_blocks == 256
        await bus.publish(GENERATE_STREAM, Generate("huge", [1] * 5000, SamplingSpec(max_tokens=5), channel.name))
        chunk = await asyncio.wait_for(channel.get(), 60)
        assert chunk.finish_reason == "error" and "context" in chunk.error
        await bus.publish(GENERATE_STREAM, Generate("ok", [4, 5], SamplingSpec(max_tokens=3), channel.name))
        while (chunk := await asyncio.wait_for(channel.get(), 60)).finish_reason is None:
            pass
        assert chunk.request_id == "ok" and chunk.finish_reason == "length"

    async with bus:
        await run_stack(bus, target, draft, body)


async def test_without_a_drafter_the_verifier_decodes_plainly(tiny_pair):
    """No drafter service answers: every step times out into plain decoding, and the output is unchanged."""
    target, _ = tiny_pair
    expected = ModelRunner(target, num_blocks=64).generate([[5, 6, 7]], SamplingParams(max_tokens=6))[0]
    async with make_bus(None) as bus:
        service = VerifierService(VerifierConfig(model_dir="", max_nodes=8, num_blocks=256, draft_timeout_s=0.05),
                                  bus, engine=_engine(target))
        task = asyncio.create_task(service.run())
        channel = bus.open_reply_channel(TokenChunk)
        await bus.publish(GENERATE_STREAM, Generate("r", [5, 6, 7], SamplingSpec(max_tokens=6), channel.name))
        chunks = await collect(channel, 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [t for c in chunks["r"] for t in c.token_ids] == expected
    assert service.drafter.timeouts > 0


async def test_the_next_turn_reuses_the_previous_turns_kv(tmp_path):
    """A conversation's second request starts with the first request's prompt and answer: those blocks come from
    the kvstore (usage.cached_tokens), and the answer is what a full prefill gives."""
    from ...conftest import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "m", seed=5)
    first = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    async with make_bus(None) as bus:
        service = VerifierService(VerifierConfig(str(model_dir), speculate=False, num_blocks=128), bus)
        task = asyncio.create_task(service.run())
        channel = bus.open_reply_channel(TokenChunk)
        await bus.publish(GENERATE_STREAM, Generate("t1", first, SamplingSpec(max_tokens=20), channel.name))
        turn1 = await collect(channel, 1)
        answer = [t for c in turn1["t1"] for t in c.token_ids]
        second = first + answer + [7, 8, 9]
        await bus.publish(GENERATE_STREAM, Generate("t2", second, SamplingSpec(max_tokens=12), channel.name))
        turn2 = await collect(channel, 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert turn1["t1"][-1].usage.cached_tokens == 0
    # 40 + 20 tokens hold KV for 59 (the last answer token was never fed): 3 full blocks of 16
    assert turn2["t2"][-1].usage.cached_tokens == 48
    expected = ModelRunner(service.engine.runner.model, num_blocks=64).generate([second], SamplingParams(max_tokens=12))
    assert [t for c in turn2["t2"] for t in c.token_ids] == expected[0]
    assert service.engine.runner.cache.num_free_blocks == 128
