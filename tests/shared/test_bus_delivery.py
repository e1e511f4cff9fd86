"""The bus under long work and over time: a live consumer keeps what it holds however long it works (its leases are
renewed), streams shed what every group has acknowledged, dead consumers and groups go, a new group replays only
what is recent, queue depth counts waiting work, and a Redis restart is ridden out (issue 18, defects 1, 3, 7)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from specrelay.shared.bus import BusConfig, BusUnavailable, make_bus

from ..redis_server import RedisServer
from .test_bus import Job, make, take  # noqa: F401 - make is the transport-parametrised bus fixture


async def until(condition, timeout_s: float = 30.0, what: str = "the bus") -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def reader(bus, stream: str, group: str, consumer: str, ack_first: int | None = None, **kw):
    """A consumer that keeps reading in the background (as a service does) and acks the first `ack_first`
    messages it gets (all of them when None); returns (task, deliveries)."""
    got = []

    async def run():
        async for d in bus.consume(stream, group, consumer, Job, **kw):
            got.append(d)
            if ack_first is None or len(got) <= ack_first:
                await d.ack()

    return asyncio.create_task(run()), got


async def stop(*tasks) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_live_consumer_keeps_a_message_past_the_claim_timeout_without_touching_it(make):
    bus = make(min_idle_ms=150)
    await bus.publish("jobs", Job(1, "long work"))
    worker = bus.consume("jobs", "workers", "busy", Job)
    held = await asyncio.wait_for(worker.__anext__(), 5)
    rival_task, rival_got = reader(make(min_idle_ms=150), "jobs", "workers", "rival")
    await asyncio.sleep(1.0)  # many claim timeouts of work, and the worker never calls touch()
    assert rival_got == []  # nobody else started the same work
    await held.ack()
    await worker.aclose()  # a consumer that stops reading stops renewing: what it still held would go now
    await bus.publish("jobs", Job(2))
    await until(lambda: _true(len(rival_got) == 1), what="the rival to get the next job")
    assert [d.msg.n for d in rival_got] == [2]
    await stop(rival_task)


async def test_a_message_released_unacknowledged_is_handed_out_again(make):
    bus = make(min_idle_ms=150)
    await bus.publish("jobs", Job(1, "failed once"))
    worker = bus.consume("jobs", "workers", "unlucky", Job)
    first = await asyncio.wait_for(worker.__anext__(), 5)
    first.release()  # the handler failed in a way another attempt may not
    rival_task, rival_got = reader(make(min_idle_ms=150), "jobs", "workers", "rival")
    await until(lambda: _true(len(rival_got) == 1), what="the released message to be handed out again")
    assert rival_got[0].msg == Job(1, "failed once") and rival_got[0].redelivered
    await stop(rival_task)
    await worker.aclose()


async def _true(value: bool) -> bool:
    return value


async def test_acknowledged_entries_are_trimmed_and_what_a_group_still_needs_is_kept(make):
    bus = make(trim_interval_ms=30)
    for i in range(20):
        await bus.publish("jobs", Job(i))
    fast, _ = reader(bus, "jobs", "fast", "f")  # acknowledges everything
    slow, slow_got = reader(make(trim_interval_ms=30), "jobs", "slow", "s", ack_first=5)  # five, then holds 15
    await until(lambda: _true(len(slow_got) == 20))
    await until(lambda: _equals(bus.stream_length("jobs"), 15), what="the acknowledged entries to be trimmed")
    for d in slow_got[5:]:
        await d.ack()
    await until(lambda: _equals(bus.stream_length("jobs"), 0), what="the stream to be empty")
    await bus.publish("jobs", Job(20))  # what is trimmed is only what was done: new work still flows
    await until(lambda: _true(len(slow_got) == 21))
    assert slow_got[-1].msg.n == 20
    await stop(fast, slow)


async def _equals(awaitable, value) -> bool:
    return await awaitable == value


async def test_queue_depth_counts_work_waiting_for_a_group_not_entries_retained(make):
    bus = make()
    assert await bus.queue_depth("jobs", "workers") == 0
    for i in range(5):
        await bus.publish("jobs", Job(i))
    assert await bus.queue_depth("jobs", "workers") == 5  # nobody reads yet: all five wait
    stream = bus.consume("jobs", "workers", "w", Job)
    first, second = await stream.__anext__(), await stream.__anext__()
    await first.ack()
    assert await bus.queue_depth("jobs", "workers") == 4  # one in progress (pending) + three not yet delivered
    await second.ack()
    await take(stream, 3)
    assert await bus.queue_depth("jobs", "workers") == 0  # idle, whatever the stream still retains
    assert await bus.queue_depth("jobs", "others") == await bus.stream_length("jobs")


async def test_a_group_created_with_a_replay_window_reads_only_recent_entries(make):
    bus = make()
    for i in range(3):
        await bus.publish("cancels", Job(i))
    await asyncio.sleep(1.5)
    for i in range(3, 5):
        await bus.publish("cancels", Job(i))
    got = await take(bus.consume("cancels", "cancel-new", "n", Job, replay_ms=1000), 2)
    assert [d.msg.n for d in got] == [3, 4]
    later = bus.consume("cancels", "cancel-new", "n", Job, replay_ms=1000)
    with pytest.raises(TimeoutError):  # and none of the older ones after
        await asyncio.wait_for(later.__anext__(), 0.3)


async def test_dead_consumers_are_pruned_and_a_dead_group_stops_holding_back_trimming(redis_url, redis_prefix):
    fast = dict(prefix=redis_prefix, block_ms=20, trim_interval_ms=30, stale_consumer_ms=400)
    key = f"{redis_prefix}stream:verifier.cancel"
    admin = aioredis.Redis.from_url(redis_url)
    buses = [make_bus(redis_url, BusConfig(**fast)) for _ in range(3)]
    try:
        for i in range(6):
            await buses[0].publish("verifier.cancel", Job(i))
        # A replica killed while it held two Cancels unacknowledged, and one killed with nothing pending.
        crashed = buses[0].consume("verifier.cancel", "cancel-crashed", "crashed", Job)
        await take(crashed, 2, ack=False)
        await crashed.aclose()
        done = buses[1].consume("verifier.cancel", "cancel-done", "done", Job)
        await take(done, 6)
        await done.aclose()
        live, _ = reader(buses[2], "verifier.cancel", "cancel-live", "live")
        await until(lambda: _equals(buses[2].stream_length("verifier.cancel"), 0),
                    what="the live group's acknowledged entries to be trimmed past the dead groups")

        async def groups():
            return {g["name"].decode(): g["consumers"] for g in await admin.xinfo_groups(key)}

        # The group with nothing pending went with its consumer; the one with pending entries keeps them.
        await until(lambda: _equals(groups(), {"cancel-crashed": 1, "cancel-live": 1}),
                    what="the dead group to be destroyed")
        await stop(live)
    finally:
        for bus in buses:
            await bus.close()
        await admin.aclose()


async def test_a_redis_restart_is_ridden_out_and_counted(tmp_path):
    server = RedisServer()
    server.start()
    config = BusConfig(block_ms=20, claim_interval_ms=50, retry_s=30)
    producer, consumer = make_bus(server.url, config), make_bus(server.url, config)
    try:
        task, got = reader(consumer, "jobs", "workers", "w")
        reply = producer.open_reply_channel(Job)  # a gateway waiting for replies: it watches for restarts
        await producer.publish("jobs", Job(1))
        await until(lambda: _true(len(got) == 1))
        assert producer.resets == 0
        server.stop()
        publishing = asyncio.create_task(producer.publish("jobs", Job(2)))  # retried while Redis is away
        await asyncio.sleep(0.5)
        server.start()  # empty: the stream and its group are gone
        await asyncio.wait_for(publishing, 30)
        await until(lambda: _true(len(got) == 2), what="the consumer to recreate its group and read on")
        assert got[1].msg.n == 2
        await until(lambda: _true(producer.resets == 1), what="the restart to be noticed")
        await consumer.reply(reply.name, Job(3))  # replies flow again, to the same channel
        assert (await reply.get(timeout_s=30)).n == 3
        assert not task.done()
        await stop(task)
    finally:
        await producer.close()
        await consumer.close()
        server.stop()
    quick = make_bus(server.url, BusConfig(retry_s=0.3))  # Redis gone for good: a clear error, not a hang
    try:
        with pytest.raises(BusUnavailable):
            await asyncio.wait_for(quick.publish("jobs", Job(4)), 30)
    finally:
        await quick.close()
