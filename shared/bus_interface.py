"""The bus's interface and the types both transports share: settings, a delivery, a reply channel (the semantics
are in bus.py; the transports are bus_local.py and bus_redis.py)."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from specrelay.shared.errors import ConfigError
from specrelay.shared.redis_keys import DEFAULT_PREFIX

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)

encoder = msgspec.msgpack.Encoder()  # one per process: msgpack of a Struct needs no state


@dataclass(frozen=True)
class BusConfig:
    prefix: str = DEFAULT_PREFIX  # every Redis key and stream lives under it (shared/redis_keys.py)
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


def decode_or_none(decoder: msgspec.msgpack.Decoder, payload: bytes, where: str) -> msgspec.Struct | None:
    """A message that does not decode as the consumer's type can never succeed: log it, and the caller acks it
    away into the dead-letter stream instead of redelivering it forever."""
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.error("bus: dropping undecodable message on %s: %s", where, e)
        return None
