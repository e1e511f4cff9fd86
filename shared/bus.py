"""The message bus: one interface, two transports (local asyncio queues here; Redis Streams in bus_redis.py).

Work queues (`publish` / `consume`) follow Redis Streams semantics on both transports, so a service behaves the same
embedded or distributed:
- a stream is a log: entries every group has acknowledged are trimmed (every `trim_interval_ms`), and `maxlen`
  bounds what a group that stops reading can leave behind;
- every consumer *group* sees every message; within a group each message goes to one consumer;
- delivery is at-least-once: a message stays pending until its handler calls `await delivery.ack()` after the work
  is done. A live consumer holds a *lease* on what it was handed and has not acknowledged: the bus renews it every
  `min_idle_ms / 3` however long the handler runs, and never hands the message to another consumer meanwhile. A
  consumer that dies (or stops consuming) holding messages loses them to a live consumer of the group once they
  have been idle for `min_idle_ms` (XAUTOCLAIM). A restarted consumer with the same name first gets its own
  pending messages back. So a handler may see a message twice only after a crash or an outage of the bus: handlers
  are idempotent by the message's own id (the verifier's request id), not by the bus's;
- a message delivered `max_deliveries` times without an ack (it crashes every handler) or that does not decode as
  the consumer's type is moved to the dead-letter stream `<stream>.dead` and acknowledged, so it cannot block the
  group forever;
- a consumer unseen for `stale_consumer_ms` with nothing pending is pruned from its group, and a group whose every
  consumer is that stale no longer holds back trimming (a killed replica's own Cancel group);
- streams and groups stay until deleted: a service that names one for itself (a verifier replica's Continue stream,
  its own Cancel group) deletes it when it stops (`delete_stream`, `delete_group`), never one another service reads.
Reply channels (`open_reply_channel` / `reply`) stream results back to one waiting caller (the gateway's per-request
token stream): ordered, one reader, no redelivery. See bus_redis.py for why they are streams and not pub/sub.

Redis going away is not an error a service sees at once: every call retries with backoff for `retry_s`, consumers
recreate their groups when a restarted Redis has lost them, and only then does a call raise `BusUnavailable`.
`Bus.resets` counts the restarts that lost the bus's data, so a caller waiting on work it published can tell that
its message may be gone (the gateway republishes a request nobody has started; generation.py).

Messages are msgspec Structs encoded as msgpack, also on the local transport: what works embedded works over Redis,
and a consumer never shares a mutable object with its producer. Tensors travel as `wire.WireTensor` fields.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec

from specrelay.shared.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)

_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class BusConfig:
    prefix: str = "specrelay:"  # every Redis key and stream lives under it
    maxlen: int = 10_000  # entries kept per work stream (approximate on Redis: MAXLEN ~)
    batch_size: int = 16  # messages fetched per read
    block_ms: int = 200  # longest wait of one read; also how soon a consumer notices close()
    min_idle_ms: int = 30_000  # a pending message idle this long is taken from its (dead) consumer
    claim_interval_ms: int = 1_000  # how often a consumer looks for such messages
    reply_maxlen: int = 100_000  # entries kept in one gateway's reply stream
    reply_ttl_s: int = 600  # a reply stream nobody writes to for this long disappears (its gateway is gone)
    max_deliveries: int = 5  # deliveries without an ack before a message is dead-lettered
    trim_interval_ms: int = 5_000  # how often a consumer trims what every group of its stream has acknowledged
    stale_consumer_ms: int = 300_000  # a consumer unseen this long is dead: pruned once nothing is pending on it
    retry_s: float = 30.0  # how long one call retries a lost Redis, with backoff, before raising BusUnavailable

    def __post_init__(self):
        if self.maxlen < 1 or self.batch_size < 1 or self.block_ms < 1 or self.min_idle_ms < 0 \
                or self.max_deliveries < 1 or self.trim_interval_ms < 1 or self.stale_consumer_ms < 1 \
                or self.retry_s < 0:
            raise ConfigError(f"bus settings out of range: {self}")

    @property
    def lease_renew_s(self) -> float:
        """How often a live consumer renews its leases: three renewals fit in one claim timeout."""
        return max(self.min_idle_ms / 3, 10) / 1000


class BusUnavailable(ConnectionError):
    """The bus stayed unreachable for `BusConfig.retry_s`. The caller's message was not sent (or not acknowledged);
    a service loop logs it and goes on, since the bus will be back."""


class Delivery(Generic[T]):
    """One message handed to one consumer. It stays pending (and will be redelivered if this consumer dies) until
    `ack()` is awaited."""

    __slots__ = ("msg", "stream", "message_id", "published_ns", "delivery_count", "_ack", "_touch", "_release")

    def __init__(self, msg: T, stream: str, message_id: str, published_ns: int, delivery_count: int,
                 ack: Callable[[], Awaitable[None]], touch: Callable[[], Awaitable[None]],
                 release: Callable[[], None]):
        self.msg = msg
        self.stream = stream
        self.message_id = message_id
        self.published_ns = published_ns  # time.time_ns() at publish: queueing latency without schema support
        self.delivery_count = delivery_count  # 1 on the first delivery
        self._ack = ack
        self._touch = touch
        self._release = release

    @property
    def redelivered(self) -> bool:
        """Taken over from a dead consumer, or handed back to this consumer after a restart."""
        return self.delivery_count > 1

    async def ack(self) -> None:
        await self._ack()

    async def touch(self) -> None:
        """Renew the lease now. The bus renews it by itself while the consumer lives; this is for a consumer that
        stopped reading and still works on what it was handed."""
        await self._touch()

    def release(self) -> None:
        """Give the message up unacknowledged: its lease is no longer renewed, so it is handed out again (to any
        consumer of the group, this one included) once idle for `min_idle_ms`. For a handler that failed in a way
        another attempt may not."""
        self._release()


class ReplyChannel(Generic[T]):
    """The reading end of a reply channel: `async for msg in channel` until `close()`. Pass `channel.name` as the
    request's `reply_to`; open the channel before publishing the request so no reply can arrive first."""

    def __init__(self, name: str, type: type[T], on_close: Callable[[str], None]):
        self.name = name
        self._decoder = msgspec.msgpack.Decoder(type)
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._on_close = on_close
        self.closed = False

    def _deliver(self, payload: bytes | None) -> None:
        self._queue.put_nowait(payload)

    async def get(self, timeout_s: float | None = None) -> T | None:
        """The next reply; None once the channel is closed. Raises TimeoutError after `timeout_s`."""
        if self.closed and self._queue.empty():
            return None
        async with asyncio.timeout(timeout_s):  # unlike wait_for on 3.11, never swallows a cancellation
            payload = await self._queue.get()
        return None if payload is None else self._decoder.decode(payload)

    def __aiter__(self) -> ReplyChannel[T]:
        return self

    async def __anext__(self) -> T:
        msg = await self.get()
        if msg is None:
            raise StopAsyncIteration
        return msg

    def close(self) -> None:
        """Stop listening; replies that arrive later are dropped (the request is finished or abandoned)."""
        if not self.closed:
            self.closed = True
            self._on_close(self.name)
            self._queue.put_nowait(None)

    async def __aenter__(self) -> ReplyChannel[T]:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class Bus(ABC):
    config: BusConfig
    resets: int = 0  # restarts of the bus's server that lost its streams while this process used it


    @abstractmethod
    async def publish(self, stream: str, msg: msgspec.Struct) -> str:
        """Append `msg` to `stream`; returns its message id."""

    @abstractmethod
    def consume(self, stream: str, group: str, consumer: str, type: type[T],
                replay_ms: int | None = None) -> AsyncIterator[Delivery[T]]:
        """Messages of `stream` for `consumer` in `group`, forever or until `close()`. A missing group is created
        reading from the oldest retained entry, or with `replay_ms` from those published in the last `replay_ms`
        (a replica's own Cancel group: older Cancels concern requests it never had). `consumer` names one live
        reader (e.g. host:pid:task): a restart may reuse it, two readers at once must not. `type` may be a union
        of tagged Structs (`Generate | Cancel`)."""

    @abstractmethod
    async def stream_length(self, stream: str) -> int:
        """Entries the stream retains (acknowledged or not, until trimmed)."""

    @abstractmethod
    async def queue_depth(self, stream: str, group: str) -> int:
        """Work waiting for `group`: messages pending on its consumers plus those not yet delivered to it."""

    @abstractmethod
    async def delete_stream(self, stream: str) -> None:
        """Remove `stream` with its consumer groups, pending entries and dead letters (`<stream>.dead`); nothing if
        it does not exist. Only for a stream that one consumer owns (a verifier replica's Continues), once that
        consumer has stopped: a shared stream's other groups belong to other services."""

    @abstractmethod
    async def delete_group(self, stream: str, group: str) -> None:
        """Remove one consumer group of `stream` and its pending entries (a group that one stopped consumer owned);
        the stream and its other groups stay. Nothing if either does not exist."""

    @abstractmethod
    async def forget_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """Remove a stopped `consumer`'s name from a shared group, unless messages are still pending on it (those
        wait for another consumer's claim, which needs them left where they are). True if it is gone. Pid-named
        consumers would otherwise pile up in the group across restarts."""

    @abstractmethod
    def open_reply_channel(self, type: type[T], name: str | None = None) -> ReplyChannel[T]:
        """A new channel that this process reads; `name` is unique when not given."""

    @abstractmethod
    async def reply(self, reply_to: str, msg: msgspec.Struct) -> None:
        """Send `msg` to the channel named `reply_to` (possibly in another process)."""

    @abstractmethod
    async def close(self) -> None: ...

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def make_bus(url: str | None, config: BusConfig | None = None) -> Bus:
    """None -> the in-process bus; redis://... or rediss://... -> Redis Streams."""
    config = config or BusConfig()
    if url is None or url == "local":
        return LocalBus(config)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from specrelay.shared.bus_redis import RedisBus

        return RedisBus(url, config)
    raise ConfigError(f"bus URL {url!r}: expected redis://host:port/db, or nothing for the in-process bus")


def decode_or_none(decoder: msgspec.msgpack.Decoder, payload: bytes, where: str) -> msgspec.Struct | None:
    """A message that does not decode as the consumer's type can never succeed: log it, and the caller acks it
    away into the dead-letter stream instead of redelivering it forever."""
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.error("bus: dropping undecodable message on %s: %s", where, e)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Local transport: every service in one process, one event loop.


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
        return str(self._stream(stream).append(time.time_ns(), _encoder.encode(msg)))

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
            channel._deliver(_encoder.encode(msg))

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
