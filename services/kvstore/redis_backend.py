"""The Redis backend: frames as plain string values, our own LRU within `capacity_bytes`.

Redis's maxmemory is server-wide and would evict other services' streams, so the store keeps its own accounting:
the frames, and their sizes, last uses, pins and totals (the keys: shared/redis_keys.py, `StoreKeys`).
Every operation that reads and changes this state is one Lua script, so processes sharing the store never see a
half-done put or evict a block between another's lookup and refresh. The `{kv}` hash tag keeps all of it in one
cluster slot, which Lua needs; a store too big for one node wants several prefixes (one per model), not one slot.

A lost Redis is retried for `retry_s` (2 s: a restart is back within it), then the call raises: the store is a
cache, and a verifier that cannot reach it prefills instead of waiting (a restarted Redis starts it empty).
"""

from __future__ import annotations

from collections.abc import Sequence

from specrelay.services.kvstore.store import KVStore, StoreStats
from specrelay.shared.redis_client import connect
from specrelay.shared.redis_keys import DEFAULT_PREFIX, StoreKeys

# KEYS: meta, size, lru, pins. ARGV: entry key prefix, hex key, frame, capacity, replace (0/1).
_PUT = """
local meta, size, lru, pins = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, id, frame, capacity = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local old = redis.call('HGET', size, id)
if old and ARGV[5] == '0' then
  redis.call('ZADD', lru, redis.call('HINCRBY', meta, 'clock', 1), id)
  return 1
end
local nbytes = string.len(frame)
local used = tonumber(redis.call('HGET', meta, 'used') or '0') - tonumber(old or '0')
local victims, free = {}, capacity - used
if nbytes <= capacity and free < nbytes then
  local offset = 0
  while free < nbytes do
    local batch = redis.call('ZRANGE', lru, offset, offset + 127)
    if #batch == 0 then break end
    for _, v in ipairs(batch) do
      if v ~= id and not redis.call('HGET', pins, v) then
        victims[#victims + 1] = v
        free = free + tonumber(redis.call('HGET', size, v))
        if free >= nbytes then break end
      end
    end
    offset = offset + 128
  end
end
if nbytes > capacity or free < nbytes then
  redis.call('HINCRBY', meta, 'rejected', 1)
  return 0
end
for _, v in ipairs(victims) do
  redis.call('DEL', prefix .. v)
  redis.call('ZREM', lru, v)
  redis.call('HDEL', size, v)
end
redis.call('SET', prefix .. id, frame)
redis.call('HSET', size, id, nbytes)
redis.call('ZADD', lru, redis.call('HINCRBY', meta, 'clock', 1), id)
redis.call('HSET', meta, 'used', capacity - free + nbytes)
redis.call('HINCRBY', meta, 'evictions', #victims)
redis.call('HINCRBY', meta, 'puts', 1)
return 1
"""

# KEYS: meta, lru. ARGV: entry key prefix, hex key, touch (0/1).
_GET = """
local frame = redis.call('GET', ARGV[1] .. ARGV[2])
if ARGV[3] == '0' then return frame end
if not frame then
  redis.call('HINCRBY', KEYS[1], 'misses', 1)
  return false
end
redis.call('HINCRBY', KEYS[1], 'hits', 1)
redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[1], 'clock', 1), ARGV[2])
return frame
"""

# KEYS: meta, size, lru. ARGV: hex keys of a chain, head first.
_LONGEST_PREFIX = """
local n = 0
for i = 1, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then break end
  n = i
end
for i = n, 1, -1 do
  redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[1], 'clock', 1), ARGV[i])
end
redis.call('HINCRBY', KEYS[1], 'hits', n)
redis.call('HINCRBY', KEYS[1], 'misses', #ARGV - n)
return n
"""

# KEYS: size, pins. ARGV: hex key, +1 or -1.
_PIN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  return 1
end
local pins = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if pins == 0 then return 0 end
if pins == 1 then redis.call('HDEL', KEYS[2], ARGV[1]) else redis.call('HINCRBY', KEYS[2], ARGV[1], -1) end
return 1
"""

# KEYS: meta, size, lru, pins. ARGV: entry key prefix, hex key.
_DELETE = """
local nbytes = redis.call('HGET', KEYS[2], ARGV[2])
if not nbytes or redis.call('HEXISTS', KEYS[4], ARGV[2]) == 1 then return 0 end
redis.call('DEL', ARGV[1] .. ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'used', -tonumber(nbytes))
return 1
"""


class RedisStore(KVStore):
    """Processes that share a prefix share one store; give them the same `capacity_bytes` (each put enforces the
    capacity its caller was configured with)."""

    def __init__(self, url: str, capacity_bytes: int, prefix: str = DEFAULT_PREFIX, retry_s: float = 2.0):
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._redis = connect(url, retry_s)
        keys = StoreKeys.under(prefix)
        self._entry_prefix = keys.entry_prefix
        self._meta, self._size, self._lru, self._pins = keys.accounting
        self._put = self._redis.register_script(_PUT)
        self._get = self._redis.register_script(_GET)
        self._longest_prefix = self._redis.register_script(_LONGEST_PREFIX)
        self._pin = self._redis.register_script(_PIN)
        self._delete = self._redis.register_script(_DELETE)

    def entry_key(self, key: bytes) -> str:
        return self._entry_prefix + key.hex()

    async def put_frame(self, key: bytes, frame: bytes | memoryview, *, replace: bool = False) -> bool:
        keys = [self._meta, self._size, self._lru, self._pins]
        args = [self._entry_prefix, key.hex(), bytes(frame), self.capacity_bytes, int(replace)]
        return bool(await self._put(keys=keys, args=args))

    async def get_frame(self, key: bytes, *, touch: bool = True) -> bytes | None:
        return await self._get(keys=[self._meta, self._lru], args=[self._entry_prefix, key.hex(), int(touch)])

    async def contains(self, key: bytes) -> bool:
        return bool(await self._redis.hexists(self._size, key.hex()))

    async def longest_prefix(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        return int(await self._longest_prefix(keys=[self._meta, self._size, self._lru],
                                              args=[k.hex() for k in keys]))

    async def pin(self, key: bytes) -> bool:
        return bool(await self._pin(keys=[self._size, self._pins], args=[key.hex(), 1]))

    async def unpin(self, key: bytes) -> bool:
        return bool(await self._pin(keys=[self._size, self._pins], args=[key.hex(), -1]))

    async def delete(self, key: bytes) -> bool:
        keys = [self._meta, self._size, self._lru, self._pins]
        return bool(await self._delete(keys=keys, args=[self._entry_prefix, key.hex()]))

    async def stats(self) -> StoreStats:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._meta)
            pipe.hlen(self._size)
            pipe.hlen(self._pins)
            meta, num_entries, num_pinned = await pipe.execute()
        count = {k.decode(): int(v) for k, v in meta.items()}
        return StoreStats(
            capacity_bytes=self.capacity_bytes, used_bytes=count.get("used", 0), num_entries=num_entries,
            num_pinned=num_pinned, hits=count.get("hits", 0), misses=count.get("misses", 0),
            puts=count.get("puts", 0), rejected=count.get("rejected", 0), evictions=count.get("evictions", 0),
        )

    async def clear(self) -> None:
        """Drop every entry and counter of this store (its prefix only; never FLUSHDB)."""
        entries = [self._entry_prefix + k.decode() for k in await self._redis.hkeys(self._size)]
        for start in range(0, len(entries), 512):
            await self._redis.delete(*entries[start:start + 512])
        await self._redis.delete(self._meta, self._size, self._lru, self._pins)

    async def close(self) -> None:
        """Disconnect; the entries stay in Redis for the other processes (that is the point of this backend)."""
        await self._redis.aclose()
