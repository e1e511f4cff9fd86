"""Reply channels over Redis: entries in one stream per *receiving process*, tagged with the channel id, read by one
XREAD loop that hands them to the open channels.

Why a stream and not pub/sub: pub/sub is at-most-once even for a live subscriber, since a reconnect silently loses
what was published meanwhile, and a gap in a token stream is a wrong answer, not a slow one. The reader resumes XREAD
from its last id after a reconnect, so replies arrive in order, without gaps and without duplicates while the
receiving process lives. If it dies they are lost, which is right: the HTTP client was attached to that process. One
stream per process (not per request) keeps it to one blocked connection per gateway however many requests are
streaming. The stream expires reply_ttl_s after its last write.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from specrelay.shared.bus_interface import BusConfig, ReplyChannel, T, encoder
from specrelay.shared.errors import ConfigError
from specrelay.shared.redis_client import stream_entries
from specrelay.shared.redis_keys import reply_stream

log = logging.getLogger(__name__)

_RETRY_S = 0.5  # pause before the reader retries after Redis stayed away for retry_s
_TRIM_EVERY = 1_000  # reply entries read between two XTRIMs of what this process already consumed


class ReplyInbox:
    """This process's reply stream (`name`), the channels open on it, and the sending side to any process's."""

    def __init__(self, redis: aioredis.Redis, config: BusConfig, name: str):
        self.name = name
        self.channels: dict[str, ReplyChannel] = {}
        self._redis = redis
        self._config = config

    def key(self, inbox: str | None = None) -> str:
        return reply_stream(self._config.prefix, inbox or self.name)

    def open(self, type: type[T], name: str | None = None) -> ReplyChannel[T]:
        channel_id = name or uuid.uuid4().hex
        if "/" in channel_id:
            raise ConfigError(f"reply channel name {channel_id!r} must not contain '/'")
        full_name = f"{self.name}/{channel_id}"
        if full_name in self.channels:
            raise ConfigError(f"reply channel {full_name!r} is already open")
        channel = ReplyChannel(full_name, type, self.channels.pop)
        self.channels[full_name] = channel
        return channel

    async def send(self, reply_to: str, msg: msgspec.Struct) -> None:
        inbox, sep, channel_id = reply_to.partition("/")
        if not sep:
            raise ConfigError(f"reply_to {reply_to!r} is not a channel name from open_reply_channel")
        key = self.key(inbox)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"c": channel_id, "b": encoder.encode(msg)},
                      maxlen=self._config.reply_maxlen, approximate=True)
            pipe.expire(key, self._config.reply_ttl_s)
            await pipe.execute()

    async def read(self, closed: Callable[[], bool]) -> None:
        """Hand every entry of this process's stream to its channel, until `closed()`."""
        key, last_id, since_trim = self.key(), b"0-0", 0
        me = asyncio.current_task()
        while not closed():
            if me is not None and me.cancelling():  # as in consume(): never loop on past a cancellation
                raise asyncio.CancelledError
            try:
                entries = stream_entries(await self._redis.xread({key: last_id}, count=256,
                                                                 block=self._config.block_ms))
                for message_id, fields in entries:
                    last_id = message_id
                    channel = self.channels.get(f"{self.name}/{fields[b'c'].decode()}")
                    if channel is not None:
                        channel._deliver(fields[b"b"])
                since_trim += len(entries)
                if since_trim >= _TRIM_EVERY:  # entries up to last_id have been read once and never will again
                    await self._redis.xtrim(key, minid=last_id, approximate=True)
                    since_trim = 0
            except (RedisConnectionError, RedisTimeoutError) as e:
                if closed():
                    return
                log.warning("bus: lost Redis while reading replies (%s); resuming after %s", e, last_id)
                await asyncio.sleep(_RETRY_S)
