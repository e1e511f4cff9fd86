"""The in-process transport of the bus: every service in one process, one event loop, the same semantics as Redis
Streams (bus.py): groups, pending entries with leases, claims of what a stopped consumer held, trimming, dead letters.
Payloads are encoded as on Redis, so a consumer never shares a mutable object with its producer."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from specrelay.shared.bus_interface import Bus, BusConfig, Delivery, ReplyChannel, T, decode_or_none, encoder
from specrelay.shared.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    entry: tuple[int, int, bytes]  # (seq, published_ns, payload)
    consumer: str
    delivered_at: float  # monotonic seconds; the idle clock XAUTOCLAIM compares against
    delivery_count: int = 0
    released: bool = False  # given up by its consumer (Delivery.release): no lease protects it


@dataclass
class _Group:
    cursor: int  # next sequence number to hand out
    pending: dict[int, _Pending] = field(default_factory=dict)
    readers: dict[str, int] = field(default_factory=dict)  # consumer -> its open consume() calls: live leases
    seen: float = field(default_factory=time.monotonic)  # when a consumer last read: a stale group trims not


class _Stream:
    def __init__(self, maxlen: int):
        self.entries: deque[tuple[int, int, bytes]] = deque(maxlen=maxlen)
        self.next_seq = 0
        self.groups: dict[str, _Group] = {}
        self.changed = asyncio.Event()

    def first_seq(self) -> int:
        return self.entries[0][0] if self.entries else self.next_seq

    def append(self, published_ns: int, payload: bytes) -> int:
        seq = self.next_seq
        self.entries.append((seq, published_ns, payload))
        self.next_seq += 1
        self.changed.set()
        return seq

    def seq_since(self, published_ns: int) -> int:
        """The first retained entry published at or after `published_ns` (the next one if none)."""
        return next((seq for seq, ns, _ in self.entries if ns >= published_ns), self.next_seq)

    def trim(self, stale_s: float) -> None:
        """Drop the entries every live group has acknowledged (below its oldest pending entry and its cursor)."""
        now = time.monotonic()
        live = [g for g in self.groups.values() if g.readers or now - g.seen < stale_s]
        if not live:  # nobody reads yet (or any more): what is here waits for a group to come
            return
        keep_from = min(min(g.pending, default=g.cursor) for g in live)
        while self.entries and self.entries[0][0] < keep_from:
            self.entries.popleft()


class LocalBus(Bus):
    def __init__(self, config: BusConfig | None = None):
        self.config = config or BusConfig()
        self._streams: dict[str, _Stream] = {}
        self._channels: dict[str, ReplyChannel] = {}
        self._closed = False

    def _stream(self, name: str) -> _Stream:
        if name not in self._streams:
            self._streams[name] = _Stream(self.config.maxlen)
        return self._streams[name]

    async def publish(self, stream: str, msg: msgspec.Struct) -> str:
        return str(self._stream(stream).append(time.time_ns(), encoder.encode(msg)))

    async def stream_length(self, stream: str) -> int:
        return len(self._stream(stream).entries)

    async def queue_depth(self, stream: str, group: str) -> int:
        s = self._streams.get(stream)
        g = s.groups.get(group) if s is not None else None
        if g is None:
            return len(s.entries) if s is not None else 0
        return len(g.pending) + s.next_seq - max(g.cursor, s.first_seq())

    async def delete_stream(self, stream: str) -> None:
        self._streams.pop(stream, None)
        self._streams.pop(stream + ".dead", None)

    async def delete_group(self, stream: str, group: str) -> None:
        if (s := self._streams.get(stream)) is not None:
            s.groups.pop(group, None)

    async def forget_consumer(self, stream: str, group: str, consumer: str) -> bool:
        # Consumers have no entry of their own here: a name exists only through its pending messages.
        g = self._streams[stream].groups.get(group) if stream in self._streams else None
        return g is None or all(p.consumer != consumer for p in g.pending.values())

    async def consume(self, stream: str, group: str, consumer: str, type: type[T],
                      replay_ms: int | None = None) -> AsyncIterator[Delivery[T]]:
        s = self._stream(stream)
        if group not in s.groups:
            start = s.first_seq() if replay_ms is None else s.seq_since(time.time_ns() - replay_ms * 1_000_000)
            s.groups[group] = _Group(cursor=start)
        g = s.groups[group]
        g.readers[consumer] = g.readers.get(consumer, 0) + 1
        try:
            async for delivery in self._consume(s, g, stream, group, consumer, msgspec.msgpack.Decoder(type)):
                yield delivery
        finally:
            g.readers[consumer] -= 1
            if not g.readers[consumer]:
                del g.readers[consumer]

    async def _consume(self, s: _Stream, g: _Group, stream: str, group: str, consumer: str,
                       decoder: msgspec.msgpack.Decoder) -> AsyncIterator[Delivery]:
        cfg = self.config
        # A consumer restarted under the same name gets its own unacknowledged messages back first.
        batch = [seq for seq, p in g.pending.items() if p.consumer == consumer]
        next_claim, next_trim = 0.0, time.monotonic() + cfg.trim_interval_ms / 1000
        while not self._closed:
            now = g.seen = time.monotonic()
            if now >= next_trim:
                next_trim = now + cfg.trim_interval_ms / 1000
                s.trim(cfg.stale_consumer_ms / 1000)
            if not batch and now >= next_claim:
                next_claim = now + cfg.claim_interval_ms / 1000
                idle_s = cfg.min_idle_ms / 1000
                # Only a consumer that stopped reading loses its messages: a live one holds its leases.
                batch = [seq for seq, p in g.pending.items() if now - p.delivered_at >= idle_s and (
                    p.released or (p.consumer != consumer and p.consumer not in g.readers))][: cfg.batch_size]
                for seq in batch:  # ours from now on, before we yield to anyone who might claim them too
                    g.pending[seq].consumer, g.pending[seq].delivered_at = consumer, now
            if not batch:
                g.cursor = max(g.cursor, s.first_seq())  # entries trimmed before this group read them are gone
                for seq, published_ns, payload in itertools.islice(s.entries, g.cursor - s.first_seq(), None):
                    if len(batch) == cfg.batch_size:
                        break
                    g.pending[seq] = _Pending((seq, published_ns, payload), consumer, now)
                    g.cursor = seq + 1
                    batch.append(seq)
            if not batch:
                s.changed.clear()
                try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation racing a wake-up
                    async with asyncio.timeout(min(cfg.block_ms, cfg.claim_interval_ms) / 1000):
                        await s.changed.wait()
                except TimeoutError:
                    pass
                continue
            for seq in batch:
                pending = g.pending.get(seq)
                if pending is None:  # acknowledged meanwhile by another consumer
                    continue
                pending.consumer, pending.delivered_at, pending.released = consumer, time.monotonic(), False
                pending.delivery_count += 1
                _, published_ns, payload = pending.entry
                msg = None
                if pending.delivery_count <= cfg.max_deliveries:
                    msg = decode_or_none(decoder, payload, f"{stream}/{group}")
                else:
                    log.error("bus: dead-lettering message %s on %s/%s after %d deliveries without an ack",
                              seq, stream, group, pending.delivery_count - 1)
                if msg is None:
                    self._stream(stream + ".dead").append(published_ns, payload)
                    g.pending.pop(seq, None)
                    continue
                yield Delivery(msg, stream, str(seq), published_ns, pending.delivery_count,
                               _local_ack(g, seq), _local_touch(g, seq, consumer), _local_release(g, seq, consumer))
            batch = []

    def open_reply_channel(self, type: type[T], name: str | None = None) -> ReplyChannel[T]:
        name = name or f"local/{uuid.uuid4().hex}"
        if name in self._channels:
            raise ConfigError(f"reply channel {name!r} is already open")
        channel = ReplyChannel(name, type, self._channels.pop)
        self._channels[name] = channel
        return channel

    async def reply(self, reply_to: str, msg: msgspec.Struct) -> None:
        channel = self._channels.get(reply_to)
        if channel is not None:
            channel._deliver(encoder.encode(msg))

    async def close(self) -> None:
        self._closed = True
        for channel in list(self._channels.values()):
            channel.close()
        for s in self._streams.values():
            s.changed.set()


def _local_ack(group: _Group, seq: int) -> Callable[[], Awaitable[None]]:
    async def ack() -> None:
        group.pending.pop(seq, None)

    return ack


def _local_touch(group: _Group, seq: int, consumer: str) -> Callable[[], Awaitable[None]]:
    async def touch() -> None:
        pending = group.pending.get(seq)
        if pending is not None and pending.consumer == consumer:
            pending.delivered_at = time.monotonic()

    return touch


def _local_release(group: _Group, seq: int, consumer: str) -> Callable[[], None]:
    def release() -> None:
        pending = group.pending.get(seq)
        if pending is not None and pending.consumer == consumer:
            pending.released = True

    return release
