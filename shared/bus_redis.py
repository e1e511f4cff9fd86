"""The Redis transport of the bus: Redis Streams with consumer groups (semantics in bus.py).

Keys, all under `config.prefix` (cluster note: a stream is one key, so streams spread over cluster slots):
  {prefix}stream:{name}        a work stream (XADD ... MAXLEN ~ maxlen), read by consumer groups
  {prefix}stream:{name}.dead   messages no consumer of the group could decode, kept for inspection
  {prefix}reply:{inbox}        the reply stream of one bus instance (one gateway process)

Work streams: the group is created idempotently at id 0 (a group made after the producer started still sees what
the stream retains) or, with `replay_ms`, at the server's clock less replay_ms; a consumer reads its own pending
entries first (a restart under the same name), then loops XAUTOCLAIM (entries idle > min_idle_ms, from a dead
consumer) every claim_interval_ms, and XREADGROUP > with BLOCK. XACK comes from `Delivery.ack()`, i.e. after the
handler's work.

Leases: one housekeeping task per bus renews every delivery its consumers hold and have not acknowledged (XCLAIM
JUSTID to the holder, min-idle 0: the idle clock restarts, the delivery count does not move) every
min_idle_ms / 3, in a script that first checks the holder still owns the entry, so a renewal never takes back what
another consumer has claimed; the same script marks each open consumer as seen. A consumer that stops (its
consume() closed, or its process dead) stops renewing and stops being seen.
The same task reads the server's run_id every second: a new one means Redis restarted and lost the streams, which
`resets` counts (Redis here keeps nothing on disk).

Trimming: every trim_interval_ms each consumer runs one script over its stream: consumers unseen for
stale_consumer_ms with nothing pending are deleted, a group none of whose consumers is fresh stops counting (and is
destroyed once it has no consumer left, if the stream has a live group), and the stream is trimmed (XTRIM MINID,
exact) below the first entry some live group still needs: its oldest pending entry, or the one after the last it
was handed. A stream nobody reads yet is left alone (MAXLEN bounds it).

Reply channels are entries in one stream per *receiving process*, tagged with the channel id, read by one XREAD
loop that hands them to the open channels. Why a stream and not pub/sub: pub/sub is at-most-once even for a live
subscriber, since a reconnect silently loses what was published meanwhile, and a gap in a token stream is a wrong
answer, not a slow one. The reader resumes XREAD from its last id after a reconnect, so replies arrive in order,
without gaps and without duplicates while the receiving process lives. If it dies they are lost, which is right:
the HTTP client was attached to that process. One stream per process (not per request) keeps it to one blocked
connection per gateway however many requests are streaming. The stream expires reply_ttl_s after its last write.

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

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from specrelay.shared.bus import Bus, BusConfig, BusUnavailable, Delivery, ReplyChannel, T, decode_or_none
from specrelay.shared.errors import ConfigError
from specrelay.shared.redis_client import connect

log = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
_RETRY_S = 0.5  # pause before a consume loop retries after Redis stayed away for retry_s
_TRIM_EVERY = 1_000  # reply entries read between two XTRIMs of what this process already consumed
_RUN_ID_EVERY_S = 1.0  # how often the housekeeping task asks whether Redis restarted
_RENEW_BATCH = 256  # entry ids per renewal script call

# KEYS: stream. ARGV: group, consumer, ids. Renews the entries `consumer` still owns; returns those it does not
# (acknowledged, claimed by another consumer, or gone with a restarted Redis). First it marks the consumer as seen:
# a read of its own pending entries past the largest id returns nothing, yet refreshes its idle time, which before
# Redis 7.2 a blocked XREADGROUP that got nothing does not (trimming judges consumers by it).
_RENEW = """
local key, group, me = KEYS[1], ARGV[1], ARGV[2]
pcall(redis.call, 'XREADGROUP', 'GROUP', group, me, 'COUNT', 1, 'STREAMS', key, '18446744073709551615-0')
local mine, lost = {}, {}
for i = 3, #ARGV do
  local ok, p = pcall(redis.call, 'XPENDING', key, group, ARGV[i], ARGV[i], 1)
  if ok and p[1] and p[1][2] == me then mine[#mine + 1] = ARGV[i] else lost[#lost + 1] = ARGV[i] end
end
if #mine > 0 then redis.call('XCLAIM', key, group, me, 0, unpack(mine), 'JUSTID') end
return lost
"""

# KEYS: stream. ARGV: stale_consumer_ms. Returns {entries trimmed, consumers pruned, groups destroyed}.
_MAINTAIN = """
local key, stale = KEYS[1], tonumber(ARGV[1])
if redis.call('EXISTS', key) == 0 then return {0, 0, 0} end
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local function parse(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local function before(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end
local keep_ms, keep_seq, pruned, dead = nil, nil, 0, {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  g = fields(g)
  local fresh, left = false, 0
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, g['name'])) do
    c = fields(c)
    if c['idle'] < stale then
      fresh, left = true, left + 1
    elseif c['pending'] == 0 then
      redis.call('XGROUP', 'DELCONSUMER', key, g['name'], c['name'])
      pruned = pruned + 1
    else
      left = left + 1
    end
  end
  if fresh then
    local ms, seq
    if g['pending'] > 0 then
      ms, seq = parse(redis.call('XPENDING', key, g['name'])[2])
    else
      ms, seq = parse(g['last-delivered-id'])
      seq = seq + 1
    end
    if keep_ms == nil or before(ms, seq, keep_ms, keep_seq) then keep_ms, keep_seq = ms, seq end
  elseif left == 0 then
    dead[#dead + 1] = g['name']
  end
end
if keep_ms == nil then return {0, pruned, 0} end
for _, name in ipairs(dead) do redis.call('XGROUP', 'DESTROY', key, name) end
local trimmed = redis.call('XTRIM', key, 'MINID', keep_ms .. '-' .. keep_seq)
return {trimmed, pruned, #dead}
"""


@contextlib.contextmanager
def _bus_call(what: str):
    """Redis stayed away past the client's retries: say so as the bus's own error."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise BusUnavailable(f"bus: Redis unavailable ({what}): {e}") from e


class RedisBus(Bus):
    def __init__(self, url: str, config: BusConfig | None = None):
        self.config = config or BusConfig()
        self.inbox = uuid.uuid4().hex[:16]  # this process's reply stream
        # Named connections: CLIENT LIST shows which bus (and so which process) holds which connection.
        self._redis = connect(url, self.config.retry_s, name=f"specrelay-bus-{self.inbox}")
        self._renew = self._redis.register_script(_RENEW)
        self._maintain = self._redis.register_script(_MAINTAIN)
        self._channels: dict[str, ReplyChannel] = {}
        self._reader: asyncio.Task | None = None
        self._housekeeper: asyncio.Task | None = None
        # each open consume(): its (stream key, group, consumer) and the ids it holds leases on
        self._leases: dict[int, tuple[tuple[str, str, str], set[bytes]]] = {}
        self._run_id: str | None = None
        self.resets = 0
        self._closed = False

    def stream_key(self, stream: str) -> str:
        return f"{self.config.prefix}stream:{stream}"

    def _reply_key(self, inbox: str) -> str:
        return f"{self.config.prefix}reply:{inbox}"

    async def publish(self, stream: str, msg: msgspec.Struct) -> str:
        with _bus_call(f"publish to {stream}"):
            message_id = await self._redis.xadd(
                self.stream_key(stream), {"b": _encoder.encode(msg), "t": time.time_ns()},
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
            await self._redis.delete(key, key + ".dead")  # a stream's groups and pending lists are part of its key

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
        held: set[bytes] = set()
        self._leases[id(held)] = ((key, group, consumer), held)
        self._start_housekeeping()
        try:
            async for delivery in self._consume(stream, key, group, consumer, type, replay_ms, held):
                yield delivery
        finally:  # a consumer that stops reading stops renewing: what it holds goes to a live one in time
            self._leases.pop(id(held), None)

    async def _consume(self, stream: str, key: str, group: str, consumer: str, type: type[T], replay_ms: int | None,
                       held: set[bytes]) -> AsyncIterator[Delivery[T]]:
        cfg = self.config
        decoder = msgspec.msgpack.Decoder(type)
        own_pending_from = "0"  # XREADGROUP with an id (not >) re-reads this consumer's own pending entries
        next_claim, claim_cursor = 0.0, b"0-0"
        next_trim = time.monotonic() + cfg.trim_interval_ms / 1000
        me = asyncio.current_task()
        group_ready = False
        while not self._closed:
            if me is not None and me.cancelling():  # redis-py can swallow a CancelledError raised mid-command
                raise asyncio.CancelledError
            try:
                if not group_ready:
                    await self._ensure_group(key, group, replay_ms)
                    group_ready = True
                if time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + cfg.trim_interval_ms / 1000
                    try:
                        await self.maintain(stream)
                    except ResponseError as e:  # housekeeping: never a reason to stop consuming
                        log.warning("bus: could not trim %s: %s", key, e)
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
                counts = await self._delivery_counts(key, group, consumer, entries) if redelivered and entries \
                    else {}
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
                group_ready, claim_cursor = False, b"0-0"
                continue
            for message_id, fields in entries:
                try:
                    delivery = await self._deliver(key, group, consumer, stream, decoder, message_id, fields,
                                                   counts.get(message_id, 2) if redelivered else 1, held)
                except (RedisConnectionError, RedisTimeoutError) as e:  # the entry stays pending: back later
                    log.warning("bus: lost Redis while handing out %s on %s (%s)", message_id, key, e)
                    continue
                if delivery is not None:
                    held.add(message_id)
                    yield delivery

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
            await self._redis.xadd(key + ".dead", fields, maxlen=self.config.maxlen, approximate=True)
            await self._redis.xack(key, group, message_id)
            return None
        lease = (key, group, consumer)
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

    def _toucher(self, lease: tuple[str, str, str], message_id: bytes) -> Callable[[], Awaitable[None]]:
        async def touch() -> None:
            with _bus_call(f"renew {message_id.decode()}"):
                await self._renew_ids(lease, [message_id])

        return touch

    async def _renew_ids(self, lease: tuple[str, str, str], ids: list[bytes]) -> list[bytes]:
        """Renew the leases on `ids` that `lease`'s consumer still owns; the others are returned, no longer held."""
        key, group, consumer = lease
        lost = []
        for start in range(0, max(len(ids), 1), _RENEW_BATCH):
            lost += await self._renew(keys=[key], args=[group, consumer, *ids[start:start + _RENEW_BATCH]])
        return lost

    # -- housekeeping: leases and restarts ---------------------------------------------------------------------

    def _start_housekeeping(self) -> None:
        if self._housekeeper is None and not self._closed:
            self._housekeeper = asyncio.create_task(self._housekeep(), name=f"bus-housekeeping-{self.inbox}")

    async def _housekeep(self) -> None:
        next_run_id = 0.0
        while not self._closed:
            try:
                for lease, held in list(self._leases.values()):  # every live consumer, holding or not
                    for message_id in await self._renew_ids(lease, sorted(held)):
                        held.discard(message_id)
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
        self._start_housekeeping()  # a reader of replies wants to know when Redis restarted (resets)
        return channel

    async def reply(self, reply_to: str, msg: msgspec.Struct) -> None:
        inbox, sep, channel_id = reply_to.partition("/")
        if not sep:
            raise ConfigError(f"reply_to {reply_to!r} is not a channel name from open_reply_channel")
        key = self._reply_key(inbox)
        with _bus_call(f"reply to {reply_to}"):
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
        for task in (self._housekeeper, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._reader is not None:
            try:
                await self._redis.delete(self._reply_key(self.inbox))
            except (RedisConnectionError, RedisTimeoutError) as e:  # it expires by itself (reply_ttl_s)
                log.warning("bus: could not delete %s (%s)", self._reply_key(self.inbox), e)
        await self._redis.aclose()


def _entries(response) -> list[tuple[bytes, dict]]:
    """[(id, fields)] of a single-stream XREAD/XREADGROUP answer (RESP2: [[stream, entries]]; empty: [] or None)."""
    return response[0][1] if response else []
