"""KV block gauges for a gateway whose verifiers run in other processes: the sum of each verifier's latest
KvReport, forgetting verifiers that have not reported for `stale_s` (gone, or scaled down)."""

from __future__ import annotations

import os
import socket
import time

from specrelay.services.gateway.metrics import KvStats
from specrelay.shared.bus import Bus
from specrelay.shared.messages import KV_STREAM, KvReport
from specrelay.shared.stopping import leave


class VerifierKvReports:
    def __init__(self, stale_s: float = 10.0):
        self.stale_s = stale_s
        self.latest: dict[str, KvReport] = {}

    async def follow(self, bus: Bus) -> None:
        """Every gateway reads every report: one consumer group per gateway process."""
        group = f"gateway-{socket.gethostname()}-{os.getpid()}"
        try:
            async for delivery in bus.consume(KV_STREAM, group, group, KvReport):
                self.latest[delivery.msg.verifier] = delivery.msg
                await delivery.ack()
        finally:
            await leave(bus, KV_STREAM, group, group, own_group=True)  # this gateway's alone

    def stats(self) -> KvStats:
        now = time.time()
        fresh = [r for r in self.latest.values() if now - r.sent_s < self.stale_s]
        return KvStats(sum(r.blocks_used for r in fresh), sum(r.blocks_total for r in fresh),
                       sum(r.blocks_kept for r in fresh))
