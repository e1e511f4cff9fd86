"""The verifier on Redis under real conditions (issue 18, defects 1 and 3): a request that runs many claim timeouts
long is served once, by one replica, and every replica lives; a request delivered twice is served once; a request
that fails fails alone; a Redis restart mid-stream is ridden out by every service, and a request it lost is
published again by the gateway instead of hanging."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest
import torch

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.service import Drafter, serve_drafter
from specrelay.services.gateway.generation import Generation, Timeouts
from specrelay.services.verifier.engine import SpecEngine
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import BusConfig, make_bus
from specrelay.shared.messages import GENERATE_STREAM, Generate, SamplingSpec, TokenChunk
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams

from ...redis_server import RedisServer

NUM_BLOCKS = 256
CLAIM_IDLE_MS = 300  # the claim timeout, short so that a test request outlasts it many times over
POISON = 97  # a prompt holding this token fails in the engine (PoisonedEngine)


class SlowEngine(SpecEngine):
    """The tiny model decodes in microseconds: each step also waits 10 ms, as a real model's forward does, so that
    a few hundred tokens take seconds (many claim timeouts)."""

    def verify(self, trees, draft_s: float = 0.0):
        time.sleep(0.01)
        return super().verify(trees, draft_s)


class PoisonedEngine(SpecEngine):
    """Fails the prefill of a prompt holding POISON, and the first step it takes after `fail_next_step` is set."""

    fail_next_step = False

    def add(self, prompts, params, tables=None, **options):
        if any(POISON in p for p in prompts):
            raise RuntimeError("poisoned prompt")
        return super().add(prompts, params, tables, **options)

    def verify(self, trees, draft_s: float = 0.0):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("a step that fails")
        return super().verify(trees, draft_s)


class Digits:
    """A decoder for Generation: token 5 reads "<5>", so the text gives the tokens back."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f"<{i}>" for i in ids)


def prompt(seed: int, n: int = 7) -> list[int]:
    return torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(target, tokens: list[int], max_tokens: int) -> list[int]:
    return ModelRunner(target, num_blocks=NUM_BLOCKS).generate([tokens], SamplingParams(max_tokens=max_tokens))[0]


def replica(bus, target, engine_type=SlowEngine, speculate: bool = True, **overrides) -> VerifierService:
    cfg = VerifierConfig(model_dir="", consumer=f"v-{uuid.uuid4().hex[:8]}", max_nodes=8, num_blocks=NUM_BLOCKS,
                         speculate=speculate, report_kv=False, **overrides)
    engine = engine_type(ModelRunner(target, num_blocks=NUM_BLOCKS), proposer=None, max_nodes=8, speculate=speculate)
    return VerifierService(cfg, bus, engine=engine)


def drafter(draft) -> Drafter:
    return Drafter(DraftModelProposer(ModelRunner(draft, num_blocks=512), max_depth=4, branch=2, width=2))


async def until(condition, timeout_s: float = 60.0, what: str = "the stack") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Replies:
    """A gateway's reply channel, sorted by request: every chunk each request got."""

    def __init__(self, bus):
        self.channel = bus.open_reply_channel(TokenChunk)
        self.name = self.channel.name
        self.chunks: dict[str, list[TokenChunk]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for chunk in self.channel:
            self.chunks.setdefault(chunk.request_id, []).append(chunk)

    async def of(self, request_id: str, timeout_s: float = 120.0) -> list[TokenChunk]:
        """Every chunk of one request once its last has come, and half a second more (a request served twice would
        send more)."""
        await until(lambda: any(c.finish_reason is not None for c in self.chunks.get(request_id, [])), timeout_s,
                    f"request {request_id} to finish")
        await asyncio.sleep(0.5)
        return self.chunks[request_id]

    async def close(self) -> None:
        self.channel.close()
        await asyncio.gather(self._reader, return_exceptions=True)


def served_once(chunks: list[TokenChunk]) -> list[int]:
    """The request's tokens, asserting what a gateway relies on: offsets that follow on with no repeat or gap, and
    exactly one last chunk."""
    tokens: list[int] = []
    for chunk in chunks:
        assert chunk.error is None, chunk.error
        assert chunk.offset == len(tokens), f"chunk at offset {chunk.offset} after {len(tokens)} tokens: served twice"
        tokens += chunk.token_ids
    assert [c.finish_reason is not None for c in chunks].count(True) == 1 and chunks[-1].finish_reason == "length"
    return tokens


async def stop(tasks) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def alive(tasks) -> None:
    for task in tasks:
        assert not task.done(), task.exception() if not task.cancelled() else "cancelled"


async def test_a_request_many_claim_timeouts_long_is_served_once_and_every_replica_lives(tiny_pair, redis_url,
                                                                                           redis_prefix):
    target, draft = tiny_pair
    config = BusConfig(prefix=redis_prefix, block_ms=20, min_idle_ms=CLAIM_IDLE_MS, claim_interval_ms=50)
    buses = [make_bus(redis_url, config) for _ in range(4)]  # a process each: two replicas, a drafter, a gateway
    gateway = buses[3]
    replicas = [replica(bus, target) for bus in buses[:2]]
    tasks = [asyncio.create_task(r.run()) for r in replicas]
    tasks.append(asyncio.create_task(serve_drafter(buses[2], drafter(draft), "d-long")))
    tokens = prompt(1)
    expected = greedy(target, tokens, 300)
    try:
        replies = Replies(gateway)
        started = time.monotonic()
        await gateway.publish(GENERATE_STREAM, Generate("long", tokens, SamplingSpec(max_tokens=300), replies.name))
        chunks = await replies.of("long")
        assert time.monotonic() - started > 3 * CLAIM_IDLE_MS / 1000, "the request must outlast the claim timeout"
        assert served_once(chunks) == expected
        alive(tasks)
        # Acknowledged, so nothing waits for the verifiers any more.
        depth = None
        for _ in range(100):
            if (depth := await gateway.queue_depth(GENERATE_STREAM, "verifier")) == 0:
                break
            await asyncio.sleep(0.05)
        assert depth == 0
    finally:
        await stop(tasks)
        for bus in buses:
            await bus.close()


@pytest.mark.parametrize("transport", ["local", "redis"])
async def test_a_request_delivered_twice_is_served_once(transport, tiny_pair, redis_url, redis_prefix):
    target, _ = tiny_pair
    bus = make_bus(redis_url if transport == "redis" else None, BusConfig(prefix=redis_prefix, block_ms=20))
    service = replica(bus, target, speculate=False)
    tasks = [asyncio.create_task(service.run())]
    tokens = prompt(2)
    expected = greedy(target, tokens, 120)
    try:
        replies = Replies(bus)
        generate = Generate("twice", tokens, SamplingSpec(max_tokens=120), replies.name)
        await bus.publish(GENERATE_STREAM, generate)
        await until(lambda: "twice" in replies.chunks, what="the first tokens")
        await bus.publish(GENERATE_STREAM, generate)  # a second copy while it runs (a republish after a reset)
        chunks = list(await replies.of("twice"))
        assert served_once(chunks) == expected
        await bus.publish(GENERATE_STREAM, generate)  # and a copy after it finished
        await asyncio.sleep(1.0)
        assert len(replies.chunks["twice"]) == len(chunks)
        for _ in range(100):  # every copy acknowledged
            if await bus.queue_depth(GENERATE_STREAM, "verifier") == 0:
                break
            await asyncio.sleep(0.05)
        assert await bus.queue_depth(GENERATE_STREAM, "verifier") == 0
        alive(tasks)
    finally:
        await stop(tasks)
        await bus.close()


async def test_a_request_that_fails_in_the_engine_fails_alone(tiny_pair):
    target, _ = tiny_pair
    bus = make_bus(None)
    service = replica(bus, target, engine_type=PoisonedEngine, speculate=False)
    tasks = [asyncio.create_task(service.run())]
    try:
        replies = Replies(bus)
        good = prompt(3)
        await bus.publish(GENERATE_STREAM, Generate("poisoned", good + [POISON], SamplingSpec(max_tokens=5),
                                                    replies.name))
        await bus.publish(GENERATE_STREAM, Generate("good", good, SamplingSpec(max_tokens=30), replies.name))
        poisoned, fine = await replies.of("poisoned"), await replies.of("good")
        assert [c.finish_reason for c in poisoned] == ["error"] and "poisoned prompt" in poisoned[0].error
        assert served_once(fine) == greedy(target, good, 30)
        service.engine.fail_next_step = True  # a whole step fails: its request gets an error, the replica goes on
        await bus.publish(GENERATE_STREAM, Generate("unlucky", good, SamplingSpec(max_tokens=30), replies.name))
        unlucky = await replies.of("unlucky")
        assert unlucky[-1].finish_reason == "error" and "a step that fails" in unlucky[-1].error
        await bus.publish(GENERATE_STREAM, Generate("after", good, SamplingSpec(max_tokens=30), replies.name))
        assert served_once(await replies.of("after")) == greedy(target, good, 30)
        assert service.engine.runner.cache.num_free_blocks == NUM_BLOCKS  # the failed requests' KV is freed
        alive(tasks)
    finally:
        await stop(tasks)
        await bus.close()


async def generation(bus, request_id: str, tokens: list[int], max_tokens: int) -> Generation:
    generate = Generate(request_id, tokens, SamplingSpec(max_tokens=max_tokens), reply_to="")
    return Generation(bus, Digits(), generate, [], lambda: False, Timeouts(chunk_s=300))


async def text_of(gen: Generation) -> list[int]:
    """The tokens a client would see, read back from the text."""
    text = "".join([delta async for delta in gen.events()])
    assert gen.finish is not None and gen.finish.reason == "length", gen.finish
    return [int(t) for t in re.findall(r"<(\d+)>", text)]


async def test_a_redis_restart_mid_stream_is_ridden_out_by_every_service(tiny_pair):
    target, draft = tiny_pair
    server = RedisServer()
    server.start()
    config = BusConfig(block_ms=20, min_idle_ms=2_000, claim_interval_ms=100)
    buses = [make_bus(server.url, config) for _ in range(3)]
    gateway = buses[2]
    service = replica(buses[0], target, max_batch=1)  # one at a time: the second request waits in the replica
    tasks = [asyncio.create_task(service.run()),
             asyncio.create_task(serve_drafter(buses[1], drafter(draft), "d-restart"))]
    streaming, queued, after = prompt(4), prompt(5), prompt(6)
    try:
        first = await generation(gateway, "streaming", streaming, 200)
        reading = asyncio.create_task(text_of(first))
        await until(lambda: first._num_received > 0, what="the first tokens")
        second = await generation(gateway, "queued", queued, 20)
        waiting = asyncio.create_task(text_of(second))
        await until(lambda: any(d.msg.request_id == "queued" for d in service.waiting), what="the queued request")
        await asyncio.to_thread(server.stop)  # Redis dies with every stream, group and pending entry...
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)  # ...and comes back empty
        assert await asyncio.wait_for(reading, 120) == greedy(target, streaming, 200)
        assert await asyncio.wait_for(waiting, 120) == greedy(target, queued, 20)
        assert gateway.resets == 1
        third = await generation(gateway, "after", after, 20)
        assert await asyncio.wait_for(text_of(third), 120) == greedy(target, after, 20)
        alive(tasks)
    finally:
        await stop(tasks)
        for bus in buses:
            await bus.close()
        server.stop()


async def test_a_request_lost_with_a_restarted_redis_is_published_again(tiny_pair):
    target, _ = tiny_pair
    server = RedisServer()
    server.start()
    config = BusConfig(block_ms=20)
    gateway, verifier_bus = make_bus(server.url, config), make_bus(server.url, config)
    tasks = []
    tokens = prompt(7)
    try:
        gen = await generation(gateway, "lost", tokens, 20)
        reading = asyncio.create_task(text_of(gen))
        await until(lambda: gateway._leases is not None and gateway._reader is not None, what="the publish")
        await asyncio.sleep(0.3)  # published, and nobody has read it yet
        await asyncio.to_thread(server.restart)  # the Generate is gone with the stream
        tasks.append(asyncio.create_task(replica(verifier_bus, target, speculate=False).run()))
        assert await asyncio.wait_for(reading, 120) == greedy(target, tokens, 20)
        alive(tasks)
    finally:
        await stop(tasks)
        await gateway.close()
        await verifier_bus.close()
        server.stop()


async def test_a_starting_replica_reads_recent_cancels_only(tiny_pair, redis_url, redis_prefix):
    import redis.asyncio as aioredis

    from specrelay.shared.messages import CANCEL_STREAM, Cancel

    target, _ = tiny_pair
    bus = make_bus(redis_url, BusConfig(prefix=redis_prefix, block_ms=20))
    admin = aioredis.Redis.from_url(redis_url)
    tasks = []
    try:
        for i in range(2000):  # the Cancels of a day's traffic, retained by the stream
            await bus.publish(CANCEL_STREAM, Cancel(f"old-{i}"))
        await asyncio.sleep(1.0)
        service = replica(bus, target, speculate=False, cancel_replay_s=0.5)
        received, take = [], service._take

        async def counting(delivery):
            received.append(delivery.msg.request_id)
            await take(delivery)

        service._take = counting
        tasks.append(asyncio.create_task(service.run()))
        replies = Replies(bus)
        await bus.publish(GENERATE_STREAM, Generate("new", prompt(8), SamplingSpec(max_tokens=10), replies.name))
        await bus.publish(CANCEL_STREAM, Cancel("recent"))
        await replies.of("new")
        await until(lambda: "recent" in received, what="the recent Cancel")
        assert sorted(received) == ["new", "recent"]  # none of the 2000 old Cancels
        groups = {g["name"].decode(): g for g in await admin.xinfo_groups(f"{redis_prefix}stream:{CANCEL_STREAM}")}
        assert groups[f"cancel-{service.cfg.consumer}"]["pending"] == 0  # and what it read is acknowledged
        alive(tasks)
    finally:
        await stop(tasks)
        await bus.close()
        await admin.aclose()
