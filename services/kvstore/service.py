"""`specrelay kvstore`: the keeper of the shared Redis KV store.

Verifiers read and write the store themselves (redis_backend.py: one Lua script per operation), so this process
serves no data. It does the two things no verifier can do alone:
- hold the store to *its* capacity. Each put evicts down to the capacity its caller was configured with, so a
  verifier started with a larger capacity, or an operator who lowers it, leaves the store over budget; every
  `--interval-s` this process evicts least recently used unpinned entries until `used <= capacity`;
- show the store: `/health` (200 with the stats while Redis answers, else 503) and `/metrics` (Prometheus text,
  written by prometheus-client).

Loop: sleep -> trim (one bounded Lua script per batch, so Redis never stalls on a large store) -> log evictions.
Redis away (restarting): the trim is retried at the next interval, /health and /metrics answer 503 meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
from dataclasses import dataclass

from specrelay.shared.errors import ConfigError
from specrelay.shared.http import listen
from specrelay.shared.redis_keys import DEFAULT_PREFIX, StoreKeys
from specrelay.shared.stopping import serve_until_stopped

log = logging.getLogger(__name__)

CAPACITY_ENV = "SPECRELAY_KV_CAPACITY"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
TRIM_BATCH = 512  # evictions per script call: a bounded stall of Redis per call

# The key layout of redis_backend.py (see its docstring). KEYS: meta, size, lru, pins.
# ARGV: entry key prefix, capacity, most evictions in this call. Returns the number evicted.
# Least recently used first, skipping pinned entries (they stay at their rank, so the next batch starts after them).
_TRIM = """
local meta, size, lru, pins = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, capacity, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local used = tonumber(redis.call('HGET', meta, 'used') or '0')
local evicted, offset = 0, 0
while used > capacity and evicted < budget do
  local batch = redis.call('ZRANGE', lru, offset, offset + 127)
  if #batch == 0 then break end
  for _, v in ipairs(batch) do
    if used <= capacity or evicted >= budget then break end
    if redis.call('HEXISTS', pins, v) == 1 then
      offset = offset + 1
    else
      used = used - tonumber(redis.call('HGET', size, v) or '0')
      redis.call('DEL', prefix .. v)
      redis.call('ZREM', lru, v)
      redis.call('HDEL', size, v)
      evicted = evicted + 1
    end
  end
end
redis.call('HSET', meta, 'used', used)
redis.call('HINCRBY', meta, 'evictions', evicted)
return evicted
"""


def parse_bytes(text: str) -> int:
    """'2G', '512M', '1048576' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"capacity {text!r}: expected a positive size such as 2G, 512M or 1048576")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


@dataclass(frozen=True)
class KeeperConfig:
    redis_url: str
    capacity_bytes: int
    prefix: str = DEFAULT_PREFIX  # the store's prefix: the one the verifiers give make_store
    host: str = "127.0.0.1"
    port: int = 8100
    interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise ConfigError("the kvstore keeper needs --redis URL (or SPECRELAY_REDIS)")
        if isinstance(self.capacity_bytes, bool) or not isinstance(self.capacity_bytes, int) or self.capacity_bytes < 1:
            raise ConfigError(f"capacity {self.capacity_bytes!r}: must be a whole number of bytes ≥ 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port}: not a TCP port")
        if not self.interval_s > 0:
            raise ConfigError(f"--interval-s {self.interval_s}: must be positive")


class StoreKeeper:
    def __init__(self, config: KeeperConfig):
        from specrelay.services.kvstore.redis_backend import RedisStore
        from specrelay.shared.redis_client import connect

        self.config = config
        self.store = RedisStore(config.redis_url, config.capacity_bytes, prefix=config.prefix)  # for stats()
        self._redis = connect(config.redis_url, retry_s=2.0)
        keys = StoreKeys.under(config.prefix)
        self._keys, self._entry_prefix = keys.accounting, keys.entry_prefix
        self._trim = self._redis.register_script(_TRIM)

    async def trim(self) -> int:
        """Evict least recently used unpinned entries until the store fits its capacity; the number evicted."""
        total = 0
        while True:
            evicted = int(await self._trim(keys=self._keys, args=[self._entry_prefix, self.config.capacity_bytes,
                                                                  TRIM_BATCH]))
            total += evicted
            if evicted < TRIM_BATCH:
                return total

    async def run(self) -> None:
        from redis.exceptions import RedisError

        while True:
            try:
                evicted = await self.trim()
                if evicted:
                    log.info("kvstore: evicted %d entries to fit %d bytes", evicted, self.config.capacity_bytes)
            except RedisError as e:  # Redis away: keep serving /health (which says so) and try again
                log.warning("kvstore: trim failed: %s", e)
            await asyncio.sleep(self.config.interval_s)

    async def close(self) -> None:
        await self.store.close()
        await self._redis.aclose()


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STATS = (("capacity_bytes", "gauge", "bytes the store may hold"),
          ("used_bytes", "gauge", "bytes of KV frames held"),
          ("num_entries", "gauge", "blocks and relayed spans held"),
          ("num_pinned", "gauge", "entries with at least one pin"),
          ("hits", "counter", "lookups that found an entry"),
          ("misses", "counter", "lookups that found none"),
          ("puts", "counter", "entries written"),
          ("rejected", "counter", "puts refused for lack of room"),
          ("evictions", "counter", "entries evicted, by puts and by this keeper"))


def metrics_text(stats) -> bytes:
    """The store's stats in Prometheus' text format, through prometheus-client. The counts live in Redis, so they
    are a custom collector's metric families read fresh at each scrape, not counters kept in this process."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class StoreStats:
        def collect(self):
            for field, kind, help_text in _STATS:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(f"specrelay_kvstore_{field}", help_text, value=getattr(stats, field))

    registry = CollectorRegistry()
    registry.register(StoreStats())
    return generate_latest(registry)


def create_app(keeper: StoreKeeper):
    import msgspec
    from aiohttp import web
    from redis.exceptions import RedisError

    async def health(request: web.Request) -> web.Response:
        try:
            stats = await keeper.store.stats()
        except (RedisError, OSError) as e:
            return web.json_response({"status": "unavailable", "error": str(e)}, status=503)
        return web.json_response({"status": "ok", "store": msgspec.structs.asdict(stats)})

    async def metrics(request: web.Request) -> web.Response:
        try:
            stats = await keeper.store.stats()
        except (RedisError, OSError) as e:
            return web.Response(text=f"# the store's Redis is unavailable: {e}\n", status=503,
                                content_type="text/plain")
        return web.Response(body=metrics_text(stats), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.shared.flags import add_redis_argument

    add_redis_argument(parser, "the Redis that holds the store")
    parser.add_argument("--capacity", default=os.environ.get(CAPACITY_ENV) or "2G",
                        help=f"bytes the store may hold, e.g. 2G (or ${CAPACITY_ENV})")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="the store's key prefix")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100, help="/health and /metrics")
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between capacity checks")


def build_config(args: argparse.Namespace) -> KeeperConfig:
    return KeeperConfig(args.redis, parse_bytes(args.capacity), args.prefix, args.host, args.port, args.interval_s)


async def serve(config: KeeperConfig) -> None:
    from aiohttp import web

    keeper = StoreKeeper(config)
    runner = web.AppRunner(create_app(keeper))
    await runner.setup()
    task = asyncio.create_task(keeper.run())
    try:
        await listen(runner, config.host, config.port)
        print(f"specrelay kvstore: keeping {config.prefix}{{kv}} within {config.capacity_bytes} bytes; "
              f"http://{config.host}:{config.port}/health", flush=True)
        await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
        await keeper.close()


def main(args: argparse.Namespace) -> int:
    config = build_config(args)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve_until_stopped(serve(config)))
    return 0
