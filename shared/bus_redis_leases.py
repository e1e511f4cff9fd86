"""Leases on Redis: what each open consume() of a bus holds and has not acknowledged, and its renewal.

The bus's housekeeping task renews every delivery its consumers hold every min_idle_ms / 3 (XCLAIM JUSTID to the
holder, min-idle 0: the idle clock restarts, the delivery count does not move), in a script that first checks the
holder still owns the entry, so a renewal never takes back what another consumer has claimed; the same script marks
each open consumer as seen. A consumer that stops (its consume() closed, or its process dead) stops renewing and
stops being seen, so what it held goes to a live consumer once idle for min_idle_ms.
"""

from __future__ import annotations

import redis.asyncio as aioredis

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

Lease = tuple[str, str, str]  # (stream key, group, consumer): one open consume()


class Leases:
    def __init__(self, redis: aioredis.Redis):
        self._renew = redis.register_script(_RENEW)
        self._open: dict[int, tuple[Lease, set[bytes]]] = {}  # id(held) -> (its consume(), the ids it holds)

    def open(self, lease: Lease) -> set[bytes]:
        """Start renewing for one consume(): it adds each id it hands out to the returned set, and removes it at
        the ack (or release)."""
        held: set[bytes] = set()
        self._open[id(held)] = (lease, held)
        return held

    def close(self, held: set[bytes]) -> None:
        """That consume() stopped reading: what it still holds is no longer renewed."""
        self._open.pop(id(held), None)

    async def renew(self, lease: Lease, ids: list[bytes]) -> list[bytes]:
        """Renew the leases on `ids` that `lease`'s consumer still owns; the others are returned, no longer held."""
        key, group, consumer = lease
        lost = []
        for start in range(0, max(len(ids), 1), _RENEW_BATCH):
            lost += await self._renew(keys=[key], args=[group, consumer, *ids[start:start + _RENEW_BATCH]])
        return lost

    async def renew_all(self) -> None:
        """One renewal of every open consume(), holding or not (an idle one is still marked as seen)."""
        for lease, held in list(self._open.values()):
            for message_id in await self.renew(lease, sorted(held)):
                held.discard(message_id)
