"""The bus, on both transports: in-order delivery, groups and competing consumers, at-least-once with XACK after
the work (a killed consumer's message is taken over), bounded streams, reply channels, poison messages."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

import msgspec
import pytest
import redis.asyncio as aioredis
import torch

from specrelay.shared.bus import BusConfig, LocalBus, make_bus
from specrelay.shared.errors import ConfigError
from specrelay.shared.wire import WireTensor


class Job(msgspec.Struct):
    n: int
    text: str = ""


class Token(msgspec.Struct):
    request_id: str
    token_id: int


class Other(msgspec.Struct):
    name: str


class Start(msgspec.Struct, tag=True):
    request_id: str


class Stop(msgspec.Struct, tag=True):
    request_id: str


class KVMessage(msgspec.Struct):
    request_id: str
    kv: WireTensor


FAST = dict(block_ms=20, min_idle_ms=150, claim_interval_ms=50)


@pytest.fixture(params=["local", "redis"])
async def make(request):
    """make(**config) -> a bus of the parametrised transport, closed after the test. On the local transport every
    call returns the same in-process bus, which is what "another process" means there."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    prefix = request.getfixturevalue("redis_prefix") if url else "specrelay:"
    buses = []

    def factory(**overrides):
        if url is None and buses:
            return buses[0]
        buses.append(make_bus(url, BusConfig(**{**FAST, "prefix": prefix, **overrides})))
        return buses[-1]

    factory.transport, factory.url, factory.prefix = request.param, url, prefix
    yield factory
    for bus in buses:
        await bus.close()


async def take(stream, n: int, timeout_s: float = 5.0, ack: bool = True) -> list:
    got = []

    async def run():
        async for d in stream:
            got.append(d)
            if ack:
                await d.ack()
            if len(got) == n:
                return

    await asyncio.wait_for(run(), timeout_s)
    return got


async def test_messages_arrive_in_publish_order_and_intact(make):
    bus = make()
    for i in range(50):
        await bus.publish("jobs", Job(i, f"job {i}"))
    got = await take(bus.consume("jobs", "workers", "w1", Job), 50)
    assert [d.msg for d in got] == [Job(i, f"job {i}") for i in range(50)]
    assert not any(d.redelivered for d in got)
    assert all(d.published_ns > 0 for d in got)
    await bus.close()


async def test_every_group_sees_every_message_and_consumers_of_a_group_share_them(make):
    bus = make()
    for i in range(40):
        await bus.publish("jobs", Job(i))
    audit = await take(bus.consume("jobs", "audit", "a1", Job), 40)
    assert [d.msg.n for d in audit] == list(range(40))

    seen: dict[str, list[int]] = {"w1": [], "w2": []}

    async def worker(name):
        async for d in bus.consume("jobs", "workers", name, Job):
            seen[name].append(d.msg.n)
            await d.ack()
            await asyncio.sleep(0.001)  # let the other worker take its turn

    tasks = [asyncio.create_task(worker(n)) for n in seen]
    for _ in range(200):
        if len(seen["w1"]) + len(seen["w2"]) == 40:
            break
        await asyncio.sleep(0.02)
    for t in tasks:
        t.cancel()
    assert sorted(seen["w1"] + seen["w2"]) == list(range(40))  # each message to exactly one consumer of the group
    assert seen["w1"] == sorted(seen["w1"]) and seen["w2"] == sorted(seen["w2"])
    await bus.close()


async def test_a_consumer_that_dies_before_ack_loses_its_message_to_a_live_one(make):
    bus = make()
    await bus.publish("jobs", Job(1, "important"))
    await bus.publish("jobs", Job(2))
    if make.transport == "redis":
        # A real process takes the first message and is SIGKILLed before it acks.
        script = textwrap.dedent(f"""
            import asyncio, os, signal, msgspec
            from specrelay.shared.bus import make_bus, BusConfig
            class Job(msgspec.Struct):
                n: int
                text: str = ""
            async def main():
                bus = make_bus({make.url!r}, BusConfig(prefix={make.prefix!r}, batch_size=1))
                async for d in bus.consume("jobs", "workers", "doomed", Job):
                    print(d.msg.n, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            asyncio.run(main())
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert proc.stdout.split() == ["1"]
    else:
        doomed = bus.consume("jobs", "workers", "doomed", Job)
        first = await doomed.__anext__()
        assert first.msg.n == 1
        await doomed.aclose()  # the consumer is gone; its message was never acknowledged

    survivor = make(batch_size=1)
    got = await take(survivor.consume("jobs", "workers", "survivor", Job), 2)
    by_n = {d.msg.n: d for d in got}
    assert set(by_n) == {1, 2}
    assert by_n[1].redelivered and by_n[1].msg.text == "important"
    # Acked now: nobody gets it again, however long we wait.
    again = survivor.consume("jobs", "workers", "third", Job)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(again.__anext__(), 0.5)


async def test_a_restarted_consumer_gets_its_own_unacked_messages_back_and_acked_ones_never(make):
    bus = make(min_idle_ms=60_000, batch_size=1)  # a larger batch would prefetch (and hold) message 2 too
    for i in range(3):
        await bus.publish("jobs", Job(i))
    first_life = bus.consume("jobs", "workers", "w1", Job)
    d0 = await first_life.__anext__()
    await d0.ack()
    d1 = await first_life.__anext__()
    assert (d0.msg.n, d1.msg.n) == (0, 1)
    await first_life.aclose()  # crash after taking 1 without acking it

    second_life = bus.consume("jobs", "workers", "w1", Job)
    got = await take(second_life, 2)
    assert [(d.msg.n, d.redelivered) for d in got] == [(1, True), (2, False)]


async def test_maxlen_bounds_the_stream(make):
    bus = make(maxlen=50)
    for i in range(1000):
        await bus.publish("jobs", Job(i))
    length = await bus.stream_length("jobs")
    # Redis trims with MAXLEN ~ at whole radix-tree nodes (100 entries by default); the local bus is exact.
    assert 50 <= length <= (150 if make.transport == "redis" else 50)
    got = await take(bus.consume("jobs", "late", "c", Job), length)
    assert [d.msg.n for d in got] == list(range(1000 - length, 1000))  # a late group reads what is retained


async def test_deleting_a_stream_or_a_group_leaves_every_other_stream_and_group_alone(make):
    bus = make()
    await bus.publish("mine", Other("undecodable"))  # to mine.dead
    await bus.publish("mine", Job(1))
    await take(bus.consume("mine", "g", "me", Job), 1)
    for i in range(2):
        await bus.publish("shared", Job(i))
    await take(bus.consume("shared", "cancel-me", "me", Job), 2)
    others = bus.consume("shared", "everyone", "them", Job)
    assert [d.msg.n for d in await take(others, 2)] == [0, 1]

    await bus.delete_stream("mine")
    await bus.delete_group("shared", "cancel-me")
    assert (await bus.stream_length("mine"), await bus.stream_length("mine.dead")) == (0, 0)
    assert await bus.stream_length("shared") == 2
    again = await take(bus.consume("shared", "cancel-me", "me", Job), 2)  # a new group reads from the oldest
    assert [(d.msg.n, d.redelivered) for d in again] == [(0, False), (1, False)]
    with pytest.raises(TimeoutError):  # the other group kept its place: nothing new for it
        await asyncio.wait_for(others.__anext__(), 0.3)
    await bus.delete_stream("mine")  # gone already, or never there: nothing to do
    await bus.delete_group("nowhere", "nobody")
    await bus.close()


async def test_a_stopped_consumer_leaves_its_group_only_when_nothing_is_pending_on_it(make):
    bus = make(min_idle_ms=60_000, batch_size=1)
    for i in range(3):
        await bus.publish("jobs", Job(i))
    await take(bus.consume("jobs", "workers", "done", Job), 1)  # took one and acked it
    unfinished = bus.consume("jobs", "workers", "crashed", Job)
    assert (await unfinished.__anext__()).msg.n == 1  # took one and stopped without acking it
    await unfinished.aclose()

    assert await bus.forget_consumer("jobs", "workers", "done")
    assert not await bus.forget_consumer("jobs", "workers", "crashed")  # message 1 waits there for a takeover
    assert await bus.forget_consumer("nowhere", "nobody", "none")
    if make.transport == "redis":
        redis = aioredis.Redis.from_url(make.url)
        try:
            consumers = await redis.xinfo_consumers(f"{make.prefix}stream:jobs", "workers")
        finally:
            await redis.aclose()
        assert [(c["name"].decode(), c["pending"]) for c in consumers] == [("crashed", 1)]
    # Nothing was lost: the unfinished message is still there for its owner's restart.
    again = await take(bus.consume("jobs", "workers", "crashed", Job), 2)
    assert [(d.msg.n, d.redelivered) for d in again] == [(1, True), (2, False)]


async def test_reply_channels_stream_in_order_to_the_right_request(make):
    gateway, verifier = make(), make()
    a = gateway.open_reply_channel(Token)
    b = gateway.open_reply_channel(Token)
    for i in range(30):
        await verifier.reply(a.name, Token("a", i))
        await verifier.reply(b.name, Token("b", 100 + i))
    got_a = [await a.get(timeout_s=5) for _ in range(30)]
    got_b = [await b.get(timeout_s=5) for _ in range(30)]
    assert got_a == [Token("a", i) for i in range(30)]
    assert got_b == [Token("b", 100 + i) for i in range(30)]

    b.close()
    await verifier.reply(b.name, Token("b", -1))  # the request is over: dropped, no error
    await verifier.reply(a.name, Token("a", 99))
    async with a:
        assert await a.get(timeout_s=5) == Token("a", 99)
    assert await b.get() is None
    assert [m async for m in a] == []


async def test_a_message_of_the_wrong_type_is_dead_lettered_not_redelivered(make, caplog):
    bus = make()
    await bus.publish("jobs", Other("not a job"))
    await bus.publish("jobs", Job(7))
    got = await take(bus.consume("jobs", "workers", "w1", Job), 1)
    assert [d.msg for d in got] == [Job(7)]
    assert "undecodable" in caplog.text
    dead = await take(bus.consume("jobs.dead", "ops", "o", Other), 1)
    assert dead[0].msg == Other("not a job")


async def test_tensors_ride_the_bus_as_raw_bytes(make):
    bus = make()
    kv = torch.randn(2, 2, 16, 2, 8).to(torch.bfloat16)
    await bus.publish("kv", KVMessage("r1", WireTensor.from_torch(kv)))
    (d,) = await take(bus.consume("kv", "g", "c", KVMessage), 1)
    assert torch.equal(d.msg.kv.to_torch(), kv)


async def test_redis_keys_stay_under_the_prefix(redis_url, redis_prefix):
    import redis.asyncio as aioredis

    bus = make_bus(redis_url, BusConfig(prefix=redis_prefix, **FAST))
    await bus.publish("jobs", Job(1))
    channel = bus.open_reply_channel(Token)
    await bus.reply(channel.name, Token("r", 1))
    assert await channel.get(timeout_s=5) == Token("r", 1)
    client = aioredis.Redis.from_url(redis_url)
    keys = sorted([k.decode() async for k in client.scan_iter(match=f"{redis_prefix}*")])
    assert keys == [f"{redis_prefix}reply:{bus.inbox}", f"{redis_prefix}stream:jobs"]
    await bus.close()
    keys = sorted([k.decode() async for k in client.scan_iter(match=f"{redis_prefix}*")])
    assert keys == [f"{redis_prefix}stream:jobs"]  # the reply stream goes with its process
    await client.aclose()


def test_make_bus_picks_the_transport_from_the_url():
    assert isinstance(make_bus(None), LocalBus)
    with pytest.raises(ConfigError, match="expected redis://"):
        make_bus("http://localhost:6379")
    with pytest.raises(ConfigError, match="out of range"):
        BusConfig(maxlen=0)


async def test_a_slow_handler_that_touches_keeps_its_message(make):
    bus = make()
    await bus.publish("jobs", Job(1))
    slow = bus.consume("jobs", "workers", "slow", Job)
    d = await slow.__anext__()
    other = make().consume("jobs", "workers", "other", Job)
    stolen = asyncio.create_task(other.__anext__())
    for _ in range(8):  # 400 ms of work against min_idle_ms = 150
        await asyncio.sleep(0.05)
        await d.touch()
    await d.ack()
    await asyncio.sleep(0.2)
    assert not stolen.done()
    stolen.cancel()


async def test_a_message_that_crashes_every_handler_is_dead_lettered_after_max_deliveries(make):
    bus = make(max_deliveries=3, min_idle_ms=0, claim_interval_ms=10)
    await bus.publish("jobs", Job(13, "poison"))
    counts = []
    for attempt in range(3):  # three consumers each take it and die without acking
        stream = bus.consume("jobs", "workers", f"w{attempt}", Job)
        d = await asyncio.wait_for(stream.__anext__(), 5)
        counts.append(d.delivery_count)
        await stream.aclose()
    assert counts == [1, 2, 3]
    await bus.publish("jobs", Job(14))
    survivor = await take(bus.consume("jobs", "workers", "w9", Job), 1)
    assert [d.msg.n for d in survivor] == [14]  # the poison message is not handed out a fourth time
    dead = await take(bus.consume("jobs.dead", "ops", "o", Job), 1)
    assert dead[0].msg == Job(13, "poison")


async def test_close_ends_a_blocked_consumer(make):
    bus = make(block_ms=100)
    got = []

    async def consumer():
        async for d in bus.consume("jobs", "workers", "w1", Job):
            got.append(d)

    task = asyncio.create_task(consumer())
    await asyncio.sleep(0.2)
    await bus.close()
    await asyncio.wait_for(task, 5)  # returns instead of raising or hanging
    assert got == []


async def test_replies_survive_a_dropped_redis_connection_without_gaps(redis_url, redis_prefix):
    """Why reply channels are streams, not pub/sub: a reconnect resumes from the last id read."""
    import redis.asyncio as aioredis

    gateway = make_bus(redis_url, BusConfig(prefix=redis_prefix, **FAST))
    verifier = make_bus(redis_url, BusConfig(prefix=redis_prefix, **FAST))
    admin = aioredis.Redis.from_url(redis_url)
    channel = gateway.open_reply_channel(Token)
    try:
        for i in range(5):
            await verifier.reply(channel.name, Token("r", i))
        assert [(await channel.get(timeout_s=5)).token_id for _ in range(5)] == list(range(5))
        ours = [c["id"] for c in await admin.client_list() if c["name"] == f"specrelay-bus-{gateway.inbox}"]
        assert ours  # the reply reader's blocked XREAD at least
        for client_id in ours:  # only this gateway's connections: the server may be shared
            await admin.client_kill_filter(_id=client_id)
        for i in range(5, 10):
            await verifier.reply(channel.name, Token("r", i))
        assert [(await channel.get(timeout_s=10)).token_id for _ in range(5)] == list(range(5, 10))
    finally:
        await gateway.close()
        await verifier.close()
        await admin.aclose()


async def test_idle_messages_behind_many_busy_ones_are_still_taken_over(make):
    bus = make(min_idle_ms=300, batch_size=40)
    for i in range(41):
        await bus.publish("jobs", Job(i))
    busy_stream = bus.consume("jobs", "workers", "busy", Job)
    busy = [await busy_stream.__anext__() for _ in range(40)]  # a live consumer holding 40 messages
    doomed = make(batch_size=1).consume("jobs", "workers", "doomed", Job)
    assert (await doomed.__anext__()).msg.n == 40
    await doomed.aclose()  # dies holding message 40, which sorts after the 40 busy ones
    await asyncio.sleep(0.35)
    for d in busy:
        await d.touch()
    # One message per XAUTOCLAIM call scans about ten pending entries on Redis: the cursor must move on.
    survivor = make(batch_size=1, min_idle_ms=300).consume("jobs", "workers", "survivor", Job)
    taken = await asyncio.wait_for(survivor.__anext__(), 5)
    assert (taken.msg.n, taken.redelivered) == (40, True)


async def test_one_stream_can_carry_a_tagged_union_of_message_types(make):
    bus = make()
    await bus.publish("control", Start("r1"))
    await bus.publish("control", Stop("r1"))
    got = await take(bus.consume("control", "g", "c", Start | Stop), 2)
    assert [d.msg for d in got] == [Start("r1"), Stop("r1")]
