"""The Redis transport of the bus: Redis Streams with consumer groups (semantics in bus.py; keys in redis_keys.py).

Work streams: the group is created idempotently at id 0 (a group made after the producer started still sees what
the stream retains) or, with `replay_ms`, at the server's clock less replay_ms; a consumer reads its own pending
entries first (a restart under the same name), then loops XAUTOCLAIM (entries idle > min_idle_ms, from a dead
consumer) every claim_interval_ms, and XREADGROUP > with BLOCK. XACK comes from `Delivery.ack()`, i.e. after the
handler's work. Leases on what a consumer holds: bus_redis_leases.py; trimming: bus_redis_trim.py; reply channels:
bus_redis_replies.py.

One housekeeping task per bus renews the leases every min_idle_ms / 3 and reads the server's run_id every second:
a new one means Redis restarted and lost the streams, which `resets` counts (Redis here keeps nothing on disk).

Every command retries a lost connection with backoff for retry_s (redis_client.py); past that, a call raises
BusUnavailable, and a consume loop keeps retrying until the bus is closed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from specrelay.shared.bus_interface import (
    Bus, BusConfig, BusUnavailable, Delivery, ReplyChannel, T, decode_or_none, encoder,
)
from specrelay.shared.bus_redis_leases import Lease, Leases
from specrelay.shared.bus_redis_replies import ReplyInbox
from specrelay.shared.bus_redis_trim import MAINTAIN
from specrelay.shared.errors import ConfigError
from specrelay.shared.redis_client import connect, stream_entries
from specrelay.shared.redis_keys import dead_letters, work_stream

log = logging.getLogger(__name__)

_RETRY_S = 0.5  # pause before a consume loop retries after Redis stayed away for retry_s
_RUN_ID_EVERY_S = 1.0  # how often the housekeeping task asks whether Redis restarted


@contextlib.contextmanager
def _bus_call(what: str):
    """Redis stayed away past the client's retries: say so as the bus's own error."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise BusUnavailable(f"bus: Redis unavailable ({what}): {e}") from e


@dataclass
class _ReadState:
    """Where one consume() is in its reading, across reads and lost connections."""

    next_trim: float  # monotonic time of its next trim
    own_pending_from: str | bytes | None = "0"  # XREADGROUP with an id (not >) re-reads its own pending entries
    next_claim: float = 0.0  # monotonic time of its next XAUTOCLAIM pass
    claim_cursor: bytes = b"0-0"  # where that pass goes on over the pending list
    group_ready: bool = False


class RedisBus(Bus):
    def __init__(self, url: str, config: BusConfig | None = None):
        self.config = config or BusConfig()
        self.inbox = uuid.uuid4().hex[:16]  # this process's reply stream
        # Named connections: CLIENT LIST shows which bus (and so which process) holds which connection.
        self._redis = connect(url, self.config.retry_s, name=f"specrelay-bus-{self.inbox}")
        self._replies = ReplyInbox(self._redis, self.config, self.inbox)
        self._maintain = self._redis.register_script(MAINTAIN)
        self._reader: asyncio.Task | None = None
        self._housekeeper: asyncio.Task | None = None
        self._leases = Leases(self._redis)
        self._run_id: str | None = None
        self.resets = 0
        self._closed = False

    def stream_key(self, stream: str) -> str:
        return work_stream(self.config.prefix, stream)

    async def publish(self, stream: str, msg: msgspec.Struct) -> str:
        with _bus_call(f"publish to {stream}"):
            message_id = await self._redis.xadd(
                self.stream_key(stream), {"b": encoder.encode(msg), "t": time.time_ns()},
                maxlen=self.config.maxlen, approximate=True,
            )
        return message_id.decode()

    async def stream_length(self, stream: str) -> int:
        with _bus_call(f"length of {stream}"):
            return await self._redis.xlen(self.stream_key(stream))

    async def queue_depth(self, stream: str, group: str) -> int:
        key = self.stream_key(stream)
        with _bus_call(f"queue depth of {stream}"):
            try:
                groups = await self._redis.xinfo_groups(key)
            except ResponseError as e:  # no such stream: nothing waits
                if "no such key" in str(e).lower():
                    return 0
                raise
            info = next((g for g in groups if g["name"].decode() == group), None)
            if info is None:  # nobody has read for this group yet: all it retains waits
                return await self._redis.xlen(key)
            if info.get("lag") is not None:
                return int(info["pending"]) + int(info["lag"])
            # The lag is unknown after deletions inside the undelivered range: count those entries.
            undelivered = await self._redis.xrange(key, min=b"(" + info["last-delivered-id"], max="+",
                                                   count=self.config.maxlen + 1)
            return int(info["pending"]) + len(undelivered)

    async def delete_stream(self, stream: str) -> None:
        self._check_open()
        key = self.stream_key(stream)
        with _bus_call(f"delete {stream}"):
            await self._redis.delete(key, dead_letters(key))  # a stream's groups and pending lists are part of its key

    async def delete_group(self, stream: str, group: str) -> None:
        self._check_open()
        with _bus_call(f"delete group {group} of {stream}"):
            try:
                await self._redis.xgroup_destroy(self.stream_key(stream), group)
            except ResponseError as e:
                if "requires the key to exist" not in str(e):
                    raise

    async def forget_consumer(self, stream: str, group: str, consumer: str) -> bool:
        self._check_open()
        key = self.stream_key(stream)
        with _bus_call(f"forget {consumer} in {stream}"):
            try:
                if await self._redis.xpending_range(key, group, min="-", max="+", count=1, consumername=consumer):
                    return False
                await self._redis.xgroup_delconsumer(key, group, consumer)  # nothing pending: nothing is lost
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
        return True

    async def maintain(self, stream: str) -> tuple[int, int, int]:
        """Prune stale consumers and groups of `stream`, trim what every live group has acknowledged: (entries
        trimmed, consumers pruned, groups destroyed). Every consumer runs it each trim_interval_ms."""
        with _bus_call(f"trim {stream}"):
            trimmed, pruned, destroyed = await self._maintain(keys=[self.stream_key(stream)],
                                                              args=[self.config.stale_consumer_ms])
        if pruned or destroyed:
            log.info("bus: %s: pruned %d stale consumer(s), %d dead group(s)", stream, pruned, destroyed)
        return int(trimmed), int(pruned), int(destroyed)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the bus is closed")

    async def _ensure_group(self, key: str, group: str, replay_ms: int | None) -> None:
        start = "0"
        if replay_ms is not None:
            seconds, micros = await self._redis.time()  # the server's clock: entry ids are written by it
            start = f"{max(seconds * 1000 + micros // 1000 - replay_ms, 0)}-0"
        try:
            await self._redis.xgroup_create(key, group, id=start, mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def consume(self, stream: str, group: str, consumer: str, type: type[T],
                      replay_ms: int | None = None) -> AsyncIterator[Delivery[T]]:
        key = self.stream_key(stream)
        held = self._leases.open((key, group, consumer))
        self._start_housekeeping()
        try:
            async for delivery in self._consume(stream, key, group, consumer, type, replay_ms, held):
                yield delivery
        finally:  # a consumer that stops reading stops renewing: what it holds goes to a live one in time
            self._leases.close(held)

    async def _consume(self, stream: str, key: str, group: str, consumer: str, type: type[T], replay_ms: int | None,
                       held: set[bytes]) -> AsyncIterator[Delivery[T]]:
        decoder = msgspec.msgpack.Decoder(type)
        state = _ReadState(next_trim=time.monotonic() + self.config.trim_interval_ms / 1000)
        me = asyncio.current_task()
        while not self._closed:
            if me is not None and me.cancelling():  # redis-py can swallow a CancelledError raised mid-command
                raise asyncio.CancelledError
            try:
                entries, counts = await self._read(stream, key, group, consumer, replay_ms, state)
            except (RedisConnectionError, RedisTimeoutError, BusUnavailable) as e:
                if self._closed:
                    return
                log.warning("bus: lost Redis while reading %s (%s); retrying", key, e)
                await asyncio.sleep(_RETRY_S)
                continue
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                log.warning("bus: group %s of %s is gone (Redis restarted?); recreating it", group, key)
                state.group_ready, state.claim_cursor = False, b"0-0"
                continue
            for message_id, fields in entries:
                try:
                    delivery = await self._deliver(key, group, consumer, stream, decoder, message_id, fields,
                                                   1 if counts is None else counts.get(message_id, 2), held)
                except (RedisConnectionError, RedisTimeoutError) as e:  # the entry stays pending: back later
                    log.warning("bus: lost Redis while handing out %s on %s (%s)", message_id, key, e)
                    continue
                if delivery is not None:
                    held.add(message_id)
                    yield delivery

    async def _read(self, stream: str, key: str, group: str, consumer: str, replay_ms: int | None,
                    state: _ReadState) -> tuple[list[tuple[bytes, dict]], dict[bytes, int] | None]:
        """The next entries for `consumer` and how often each has now been delivered (None: new entries, delivered
        once): its own pending entries first, then every claim_interval_ms those idle on dead consumers, else new
        ones. Trims the stream every trim_interval_ms on the way."""
        cfg = self.config
        if not state.group_ready:
            await self._ensure_group(key, group, replay_ms)
            state.group_ready = True
        if time.monotonic() >= state.next_trim:
            state.next_trim = time.monotonic() + cfg.trim_interval_ms / 1000
            try:
                await self.maintain(stream)
            except ResponseError as e:  # housekeeping: never a reason to stop consuming
                log.warning("bus: could not trim %s: %s", key, e)
        if state.own_pending_from is not None:
            entries = stream_entries(await self._redis.xreadgroup(
                group, consumer, {key: state.own_pending_from}, count=cfg.batch_size))
            state.own_pending_from = entries[-1][0] if entries else None
        elif time.monotonic() >= state.next_claim:
            state.claim_cursor, entries = await self._claim_idle(key, group, consumer, state.claim_cursor)
            if state.claim_cursor == b"0-0" and not entries:  # a whole pass over the pending list found none
                state.next_claim = time.monotonic() + cfg.claim_interval_ms / 1000
        else:
            block_ms = max(1, min(cfg.block_ms, int((state.next_claim - time.monotonic()) * 1000)))
            return stream_entries(await self._redis.xreadgroup(
                group, consumer, {key: ">"}, count=cfg.batch_size, block=block_ms)), None
        return entries, await self._delivery_counts(key, group, consumer, entries) if entries else {}

    async def _deliver(self, key: str, group: str, consumer: str, stream: str, decoder, message_id: bytes,
                       fields: dict, delivery_count: int, held: set[bytes]) -> Delivery | None:
        """The entry as a Delivery; None if it is acknowledged away instead: trimmed while pending, undecodable,
        or delivered too often (then to the dead-letter stream)."""
        if not fields:  # trimmed while pending: nothing left to do
            await self._redis.xack(key, group, message_id)
            return None
        msg = None
        if delivery_count <= self.config.max_deliveries:
            msg = decode_or_none(decoder, fields[b"b"], f"{key}/{group}")
        else:
            log.error("bus: dead-lettering message %s on %s/%s after %d deliveries without an ack",
                      message_id.decode(), key, group, delivery_count - 1)
        if msg is None:
            await self._redis.xadd(dead_letters(key), fields, maxlen=self.config.maxlen, approximate=True)
            await self._redis.xack(key, group, message_id)
            return None
        lease: Lease = (key, group, consumer)
        return Delivery(msg, stream, message_id.decode(), int(fields.get(b"t", 0)), delivery_count,
                        self._acker(key, group, message_id, held), self._toucher(lease, message_id),
                        lambda: held.discard(message_id))

    async def _claim_idle(self, key: str, group: str, consumer: str,
                          cursor: bytes) -> tuple[bytes, list[tuple[bytes, dict]]]:
        """One XAUTOCLAIM step. It scans a bounded part of the pending list per call, so the cursor is carried
        across calls: restarting at 0-0 each time would never reach idle entries behind many busy ones."""
        next_cursor, claimed, *_deleted = await self._redis.xautoclaim(
            key, group, consumer, min_idle_time=self.config.min_idle_ms, start_id=cursor,
            count=self.config.batch_size)
        if claimed:
            log.info("bus: %s took over %d idle message(s) on %s", consumer, len(claimed), key)
        return next_cursor, claimed

    async def _delivery_counts(self, key: str, group: str, consumer: str,
                               entries: list[tuple[bytes, dict]]) -> dict[bytes, int]:
        """How often each redelivered entry has now been delivered (XAUTOCLAIM and a re-read of one's own pending
        entries both count one more), from one XPENDING over their id range."""
        rows = await self._redis.xpending_range(key, group, min=entries[0][0], max=entries[-1][0],
                                                count=max(100, 4 * len(entries)), consumername=consumer)
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}

    def _acker(self, key: str, group: str, message_id: bytes, held: set[bytes]) -> Callable[[], Awaitable[None]]:
        async def ack() -> None:
            held.discard(message_id)
            try:
                await self._redis.xack(key, group, message_id)
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as e:  # ResponseError: NOGROUP
                # Still pending, so redelivered later; handlers are idempotent by their request's id. A restarted
                # Redis has lost the entry anyway.
                log.warning("bus: could not acknowledge %s on %s (%s)", message_id.decode(), key, e)

        return ack

    def _toucher(self, lease: Lease, message_id: bytes) -> Callable[[], Awaitable[None]]:
        async def touch() -> None:
            with _bus_call(f"renew {message_id.decode()}"):
                await self._leases.renew(lease, [message_id])

        return touch

    # -- housekeeping: leases and restarts ---------------------------------------------------------------------

    def _start_housekeeping(self) -> None:
        if self._housekeeper is None and not self._closed:
            self._housekeeper = asyncio.create_task(self._housekeep(), name=f"bus-housekeeping-{self.inbox}")

    async def _housekeep(self) -> None:
        next_run_id = 0.0
        while not self._closed:
            try:
                await self._leases.renew_all()
                if time.monotonic() >= next_run_id:
                    next_run_id = time.monotonic() + _RUN_ID_EVERY_S
                    await self._check_restart()
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as e:
                log.warning("bus: housekeeping failed (%s); retrying", e)
            await asyncio.sleep(min(self.config.lease_renew_s, _RUN_ID_EVERY_S, self.config.stale_consumer_ms / 4000))

    async def _check_restart(self) -> None:
        run_id = (await self._redis.info("server")).get("run_id")
        if self._run_id is not None and run_id != self._run_id:
            self.resets += 1
            log.warning("bus: Redis restarted (run_id %s -> %s): its streams and groups are new", self._run_id,
                        run_id)
        self._run_id = run_id

    # -- reply channels (bus_redis_replies.py) -----------------------------------------------------------------

    def open_reply_channel(self, type: type[T], name: str | None = None) -> ReplyChannel[T]:
        self._check_open()
        channel = self._replies.open(type, name)
        if self._reader is None:
            self._reader = asyncio.create_task(self._replies.read(lambda: self._closed),
                                               name=f"bus-replies-{self.inbox}")
        self._start_housekeeping()  # a reader of replies wants to know when Redis restarted (resets)
        return channel

    async def reply(self, reply_to: str, msg: msgspec.Struct) -> None:
        with _bus_call(f"reply to {reply_to}"):
            await self._replies.send(reply_to, msg)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in list(self._replies.channels.values()):
            channel.close()
        for task in (self._housekeeper, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._reader is not None:
            try:
                await self._redis.delete(self._replies.key())
            except (RedisConnectionError, RedisTimeoutError) as e:  # it expires by itself (reply_ttl_s)
                log.warning("bus: could not delete %s (%s)", self._replies.key(), e)
        await self._redis.aclose()

