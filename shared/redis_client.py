"""One way to open a Redis client for every service: commands that meet a lost connection (Redis restarting, still
loading, a network blip) are retried with exponential backoff for about `retry_s` before the error reaches the
caller. redis-py's own Retry does the work; this only sizes it in seconds rather than attempts."""

from __future__ import annotations

import math

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

FIRST_BACKOFF_S = 0.05  # doubles per failure...
MAX_BACKOFF_S = 1.0  # ...up to this: a restarted Redis is found within a second of coming back
CONNECT_TIMEOUT_S = 2.0  # an unreachable host fails an attempt this fast instead of the kernel's minutes


def attempts_for(retry_s: float) -> int:
    """Retries whose backoffs add up to at least `retry_s` (ExponentialBackoff waits min(cap, base * 2**n))."""
    waited, retries = 0.0, 0
    while waited < retry_s:
        retries += 1
        waited += min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** retries)
        if waited >= MAX_BACKOFF_S * 4:  # from here every wait is the cap
            retries += math.ceil(max(retry_s - waited, 0) / MAX_BACKOFF_S)
            break
    return retries


def connect(url: str, retry_s: float, name: str | None = None) -> aioredis.Redis:
    """A client for `url` whose commands ride out a Redis outage of up to about `retry_s` seconds."""
    retry = Retry(ExponentialBackoff(cap=MAX_BACKOFF_S, base=FIRST_BACKOFF_S), attempts_for(retry_s))
    return aioredis.Redis.from_url(url, client_name=name, retry=retry,
                                   retry_on_error=[BusyLoadingError, ConnectionError, TimeoutError],
                                   socket_connect_timeout=CONNECT_TIMEOUT_S)


def stream_entries(response) -> list[tuple[bytes, dict]]:
    """[(id, fields)] of a single-stream XREAD/XREADGROUP answer (RESP2: [[stream, entries]]; empty: [] or None)."""
    return response[0][1] if response else []
