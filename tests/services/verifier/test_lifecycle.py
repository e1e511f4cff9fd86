"""A verifier replica that stops gives back what it holds: its KV blocks (held, kept and running requests), the
kvstore (shared-memory segments unlinked, Redis connections closed), its own Continue stream and Cancel group on
the bus (not another replica's), and an error to a Continue it had received, so the sender falls back at once.
A Generate it had not finished stays pending for another replica."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import uuid
import warnings

import pytest
import redis.asyncio as aioredis

from specrelay.services.kvstore.shm import ShmStore
from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import BusConfig, make_bus
from specrelay.shared.messages import (
    CANCEL_STREAM,
    GENERATE_STREAM,
    Cancel,
    Continue,
    Generate,
    SamplingSpec,
    TokenChunk,
    continue_stream,
)
from specrelay.shared.pte import PteProfile

from .test_held_service import PROMPT, TOOL_ANSWER, Stack, model_dir, stop_token, tokens  # noqa: F401

NUM_BLOCKS = 128
SHM_DIR = "/dev/shm"


def shm_segments(name: str) -> list[str]:
    return [entry for entry in os.listdir(SHM_DIR) if entry.startswith(f"{name}.")]


async def until(condition, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out waiting for the verifier")


async def group_names(redis, key: str) -> list[str]:
    return sorted(g["name"].decode() for g in await redis.xinfo_groups(key))


async def chunks_until_done(channel, request_id: str) -> list[TokenChunk]:
    out = []
    while not out or (out[-1].finish_reason is None and out[-1].error is None):
        chunk = await asyncio.wait_for(channel.get(), 60)
        if chunk.request_id == request_id:
            out.append(chunk)
    return out


@pytest.mark.parametrize("kvstore", ["shm", "redis"])
async def test_a_stopped_replica_leaves_nothing_of_its_own_in_redis(model_dir, stop_token, redis_url, redis_prefix,
                                                                    kvstore, caplog):
    consumer, shm_name = f"v-{uuid.uuid4().hex[:8]}", f"specrelay-test-{uuid.uuid4().hex[:12]}"
    cfg = VerifierConfig(str(model_dir), speculate=False, num_blocks=NUM_BLOCKS, report_kv=False, consumer=consumer,
                         max_batch=1, kvstore=f"shm://{shm_name}" if kvstore == "shm" else redis_url,
                         kvstore_prefix=redis_prefix, kvstore_capacity_bytes=8 << 20)
    key = lambda stream: f"{redis_prefix}stream:{stream}"  # noqa: E731
    own_stream, cancel_key = key(continue_stream(consumer)), key(CANCEL_STREAM)
    redis = aioredis.Redis.from_url(redis_url)
    # Another replica's Continue stream and Cancel group, which this one must leave alone.
    await redis.xgroup_create(key(continue_stream("v-other")), "verifier", mkstream=True)
    await redis.xgroup_create(cancel_key, "cancel-v-other", mkstream=True)
    gc.collect()  # what earlier tests left for the collector is not this test's to report
    caplog.set_level(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with make_bus(redis_url, BusConfig(prefix=redis_prefix, block_ms=20)) as bus:
                service = VerifierService(cfg, bus)
                task = asyncio.create_task(service.run())
                stack = Stack(service, bus, bus.open_reply_channel(TokenChunk))
                first = await stack.generate("r1", PROMPT, stop_token, hold_s=30)
                assert first[-1].holder == consumer and len(service.held) == 1
                assert await redis.exists(own_stream)
                assert f"cancel-{consumer}" in await group_names(redis, cancel_key)
                assert kvstore != "shm" or f"{shm_name}.idx" in shm_segments(shm_name)
                # A long request takes the one batch slot, so that a Continue for r1 has to wait for it.
                await bus.publish(GENERATE_STREAM, Generate("r2", PROMPT, SamplingSpec(max_tokens=900),
                                                            stack.channel.name))
                await until(lambda: "r2" in service.live)
                await bus.publish(continue_stream(consumer), Continue("r1", TOOL_ANSWER, SamplingSpec(max_tokens=4),
                                                                      stack.channel.name))
                await until(lambda: len(service.scheduler.continues) == 1)
                assert "r2" in service.live and service.engine.runner.cache.num_free_blocks < NUM_BLOCKS

                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                refused = await chunks_until_done(stack.channel, "r1")
                assert refused[-1].finish_reason == "error" and f"verifier {consumer} stopped" in refused[-1].error
                assert service.engine.runner.cache.num_free_blocks == NUM_BLOCKS and len(service.held) == 0
                assert not await redis.exists(own_stream)
                assert await redis.exists(key(continue_stream("v-other")))
                assert await group_names(redis, cancel_key) == ["cancel-v-other"]
                # r2 was not finished: it waits in the shared group for another replica to take it over
                assert (await redis.xpending(key(GENERATE_STREAM), "verifier"))["pending"] == 1
                # and so this replica's name stays in the shared group, where the takeover finds it
                consumers = await redis.xinfo_consumers(key(GENERATE_STREAM), "verifier")
                assert [(c["name"].decode(), c["pending"]) for c in consumers] == [(consumer, 1)]
                assert kvstore != "shm" or shm_segments(shm_name) == []
            del service, task, stack
            gc.collect()  # an unclosed Redis connection says so when it is collected
        assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        ShmStore.destroy(shm_name)  # what a failed run left
        keys = [k async for k in redis.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_on_the_in_process_bus_a_closed_bus_ends_the_replica_and_frees_what_it_held(model_dir, stop_token,
                                                                                         tmp_path):
    profile_file = tmp_path / "pte.json"
    PteProfile(gamma=0.002, prefill_s_per_token=1e-4, decode_a_s=5e-4).save(profile_file)
    shm_name = f"specrelay-test-{uuid.uuid4().hex[:12]}"
    cfg = VerifierConfig(str(model_dir), speculate=False, num_blocks=NUM_BLOCKS, report_kv=False, consumer="v-local",
                         kvstore=f"shm://{shm_name}", kvstore_capacity_bytes=8 << 20, pte_profile=str(profile_file))
    bus = make_bus(None)
    service = VerifierService(cfg, bus)
    task = asyncio.create_task(service.run())
    try:
        stack = Stack(service, bus, bus.open_reply_channel(TokenChunk))
        first = await stack.generate("r1", PROMPT, stop_token, hold_s=30)
        assert tokens(await stack.resume(first[-1].holder, "r1", TOOL_ANSWER))  # a tool round, then released
        paused = await stack.generate("t1", PROMPT, stop_token, hold_s=30)
        for _ in range(5):  # lookups come back within a millisecond: worth keeping on the device
            service.retention.policy.observe_pause(["lookup"], 0.001)
        await bus.publish(CANCEL_STREAM, Cancel("t1", tool_names=["lookup"]))  # a client tool pause: kept
        await until(lambda: [p.key for p in service.retention.kept] == ["t1"])
        held = await stack.generate("r3", PROMPT, stop_token, hold_s=30)
        assert paused[-1].holder == held[-1].holder == "v-local" and len(service.held) == 1
        assert await bus.stream_length(continue_stream("v-local")) == 1
        assert f"{shm_name}.idx" in shm_segments(shm_name)

        await bus.close()
        await asyncio.wait_for(task, 5)  # returns by itself: the bus is gone
        assert service.engine.runner.cache.num_free_blocks == NUM_BLOCKS
        assert len(service.held) == 0 and service.retention.kept == []
        assert shm_segments(shm_name) == []
        await service.close()  # again: nothing left to do, and no error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
        ShmStore.destroy(shm_name)
