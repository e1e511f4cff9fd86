"""The Redis transport of the bus: Redis Streams with consumer groups (semantics in bus.py).

Keys, all under `config.prefix` (cluster note: a stream is one key, so streams spread over cluster slots):
  {prefix}stream:{name}        a work stream (XADD ... MAXLEN ~ maxlen), read by consumer groups
  {prefix}stream:{name}.dead   messages no consumer of the group could decode, kept for inspection
  {prefix}reply:{inbox}        the reply stream of one bus instance (one gateway process)

Work streams: the group is created idempotently at id 0 (a group made after the producer started still sees what
the stream retains); a consumer reads its own pending entries first (a restart under the same name), then loops
XAUTOCLAIM (entries idle > min_idle_ms, from a dead consumer) every claim_interval_ms, and XREADGROUP > with BLOCK.
XACK comes from `Delivery.ack()`, i.e. after the handler's work.

Reply channels are entries in one stream per *receiving process*, tagged with the channel id, read by one XREAD
loop that hands them to the open channels. Why a stream and not pub/sub: pub/sub is at-most-once even for a live
subscriber, since a reconnect silently loses what was published meanwhile, and a gap in a token stream is a wrong
answer, not a slow one. The reader resumes XREAD from its last id after a reconnect, so replies arrive in order,
without gaps and without duplicates while the receiving process lives. If it dies they are lost, which is right:
the HTTP client was attached to that process. One stream per process (not per request) keeps it to one blocked
connection per gateway however many requests are streaming. The stream expires reply_ttl_s after its last write.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from specrelay.shared.bus import Bus, BusConfig, Delivery, ReplyChannel, T, decode_or_none
from specrelay.shared.errors import ConfigError

log = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
_RETRY_S = 0.5  # pause before retrying after Redis went away
_TRIM_EVERY = 1_000  # reply entries read between two XTRIMs of what this process already consumed


class RedisBus(Bus):
    def __init__(self, url: str, config: BusConfig | None = None):
        self.config = config or BusConfig()
        self.inbox = uuid.uuid4().hex[:16]  # this process's reply stream
        # Named connections: CLIENT LIST shows which bus (and so which process) holds which connection.
        self._redis = aioredis.Redis.from_url(url, client_name=f"specrelay-bus-{self.inbox}")
        self._channels: dict[str, ReplyChannel] = {}
        self._reader: asyncio.Task | None = None
        self._closed = False

    def stream_key(self, stream: str) -> str:
        return f"{self.config.prefix}stream:{stream}"

    def _reply_key(self, inbox: str) -> str:
        return f"{self.config.prefix}reply:{inbox}"

    async def publish(self, stream: str, msg: msgspec.Struct) -> str:
        message_id = await self._redis.xadd(
            self.stream_key(stream), {"b": _encoder.encode(msg), "t": time.time_ns()},
            maxlen=self.config.maxlen, approximate=True,
        )
        return message_id.decode()

    async def stream_length(self, stream: str) -> int:
        return await self._redis.xlen(self.stream_key(stream))

    async def delete_stream(self, stream: str) -> None:
        self._check_open()
        key = self.stream_key(stream)
        await self._redis.delete(key, key + ".dead")  # a stream's groups and pending lists are part of its key

    async def delete_group(self, stream: str, group: str) -> None:
        self._check_open()
        try:
            await self._redis.xgroup_destroy(self.stream_key(stream), group)
        except ResponseError as e:
            if "requires the key to exist" not in str(e):
                raise

    async def forget_consumer(self, stream: str, group: str, consumer: str) -> bool:
        self._check_open()
        key = self.stream_key(stream)
        try:
            if await self._redis.xpending_range(key, group, min="-", max="+", count=1, consumername=consumer):
                return False
            await self._redis.xgroup_delconsumer(key, group, consumer)  # it has nothing pending: nothing is lost
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the bus is closed")

    async def _ensure_group(self, key: str, group: str) -> None:
        try:
            await self._redis.xgroup_create(key, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def consume(self, stream: str, group: str, consumer: str, type: type[T]) -> AsyncIterator[Delivery[T]]:
        key, cfg = self.stream_key(stream), self.config
        decoder = msgspec.msgpack.Decoder(type)
        await self._ensure_group(key, group)
        own_pending_from = "0"  # XREADGROUP with an id (not >) re-reads this consumer's own pending entries
        next_claim, claim_cursor = 0.0, b"0-0"
        me = asyncio.current_task()
        while not self._closed:
            if me is not None and me.cancelling():  # redis-py can swallow a CancelledError raised mid-command
                raise asyncio.CancelledError
            try:
                if own_pending_from is not None:
                    entries = _entries(await self._redis.xreadgroup(
                        group, consumer, {key: own_pending_from}, count=cfg.batch_size))
                    own_pending_from = entries[-1][0] if entries else None
                    redelivered = True
                elif time.monotonic() >= next_claim:
                    claim_cursor, entries = await self._claim_idle(key, group, consumer, claim_cursor)
                    if claim_cursor == b"0-0" and not entries:  # a whole pass over the pending list found none
                        next_claim = time.monotonic() + cfg.claim_interval_ms / 1000
                    redelivered = True
                else:
                    block_ms = max(1, min(cfg.block_ms, int((next_claim - time.monotonic()) * 1000)))
                    entries = _entries(await self._redis.xreadgroup(
                        group, consumer, {key: ">"}, count=cfg.batch_size, block=block_ms))
                    redelivered = False
            except (RedisConnectionError, RedisTimeoutError) as e:
                if self._closed:
                    return
                log.warning("bus: lost Redis while reading %s (%s); retrying", key, e)
                await asyncio.sleep(_RETRY_S)
                continue
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self._ensure_group(key, group)  # Redis restarted without persistence
                continue
            counts = await self._delivery_counts(key, group, consumer, entries) if redelivered and entries else {}
            for message_id, fields in entries:
                if not fields:  # trimmed while pending: nothing left to do
                    await self._redis.xack(key, group, message_id)
                    continue
                delivery_count = counts.get(message_id, 2) if redelivered else 1
                msg = None
                if delivery_count <= cfg.max_deliveries:
                    msg = decode_or_none(decoder, fields[b"b"], f"{key}/{group}")
                else:
                    log.error("bus: dead-lettering message %s on %s/%s after %d deliveries without an ack",
                              message_id.decode(), key, group, delivery_count - 1)
                if msg is None:
                    await self._redis.xadd(key + ".dead", fields, maxlen=cfg.maxlen, approximate=True)
                    await self._redis.xack(key, group, message_id)
                    continue
                yield Delivery(msg, stream, message_id.decode(), int(fields.get(b"t", 0)), delivery_count,
                               self._acker(key, group, message_id), self._toucher(key, group, consumer, message_id))

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

    def _acker(self, key: str, group: str, message_id: bytes) -> Callable[[], Awaitable[None]]:
        async def ack() -> None:
            await self._redis.xack(key, group, message_id)

        return ack

    def _toucher(self, key: str, group: str, consumer: str, message_id: bytes) -> Callable[[], Awaitable[None]]:
        async def touch() -> None:
            # XCLAIM to ourselves with min-idle 0 resets the idle time; JUSTID leaves the delivery count alone.
            await self._redis.xclaim(key, group, consumer, min_idle_time=0, message_ids=[message_id], justid=True)

        return touch

    # -- reply channels ----------------------------------------------------------------------------------------

    def open_reply_channel(self, type: type[T], name: str | None = None) -> ReplyChannel[T]:
        self._check_open()
        channel_id = name or uuid.uuid4().hex
        if "/" in channel_id:
            raise ConfigError(f"reply channel name {channel_id!r} must not contain '/'")
        full_name = f"{self.inbox}/{channel_id}"
        if full_name in self._channels:
            raise ConfigError(f"reply channel {full_name!r} is already open")
        channel = ReplyChannel(full_name, type, self._channels.pop)
        self._channels[full_name] = channel
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_replies(), name=f"bus-replies-{self.inbox}")
        return channel

    async def reply(self, reply_to: str, msg: msgspec.Struct) -> None:
        inbox, sep, channel_id = reply_to.partition("/")
        if not sep:
            raise ConfigError(f"reply_to {reply_to!r} is not a channel name from open_reply_channel")
        key = self._reply_key(inbox)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"c": channel_id, "b": _encoder.encode(msg)},
                      maxlen=self.config.reply_maxlen, approximate=True)
            pipe.expire(key, self.config.reply_ttl_s)
            await pipe.execute()

    async def _read_replies(self) -> None:
        key, last_id, since_trim = self._reply_key(self.inbox), b"0-0", 0
        me = asyncio.current_task()
        while not self._closed:
            if me is not None and me.cancelling():  # as in consume(): never loop on past a cancellation
                raise asyncio.CancelledError
            try:
                entries = _entries(await self._redis.xread({key: last_id}, count=256, block=self.config.block_ms))
                for message_id, fields in entries:
                    last_id = message_id
                    channel = self._channels.get(f"{self.inbox}/{fields[b'c'].decode()}")
                    if channel is not None:
                        channel._deliver(fields[b"b"])
                since_trim += len(entries)
                if since_trim >= _TRIM_EVERY:  # entries up to last_id have been read once and never will again
                    await self._redis.xtrim(key, minid=last_id, approximate=True)
                    since_trim = 0
            except (RedisConnectionError, RedisTimeoutError) as e:
                if self._closed:
                    return
                log.warning("bus: lost Redis while reading replies (%s); resuming after %s", e, last_id)
                await asyncio.sleep(_RETRY_S)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in list(self._channels.values()):
            channel.close()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            await self._redis.delete(self._reply_key(self.inbox))
        await self._redis.aclose()


def _entries(response) -> list[tuple[bytes, dict]]:
    """[(id, fields)] of a single-stream XREAD/XREADGROUP answer (RESP2: [[stream, entries]]; empty: [] or None)."""
    return response[0][1] if response else []
