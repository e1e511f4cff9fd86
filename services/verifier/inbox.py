"""What one verifier replica reads from the bus, merged into one queue in arrival order, and what of it is its own.

    verifier.generate              group "verifier", shared by every replica: each Generate goes to one of them
    verifier.cancel                group "cancel-<consumer>", this replica's: every replica sees every Cancel (and
                                   Preempt) published from `cancel_replay_ms` before it started on (not the whole
                                   stream)
    verifier.continue.<consumer>   this replica's stream: Continues for the requests it holds (held.py)

The replica's own group and stream are named for its consumer (`VerifierConfig.consumer`, host and pid), so they
would pile up in Redis across restarts: `delete_own` removes them when the replica stops, and never touches a
shared group or another replica's stream. Its name in the shared Generate group goes too, unless a Generate it had
not finished is pending on it (another replica claims that from there).
"""

from __future__ import annotations

import asyncio

from specrelay.shared.bus import Bus, Delivery
from specrelay.shared.messages import (
    CANCEL_STREAM,
    GENERATE_STREAM,
    Cancel,
    Continue,
    Generate,
    Preempt,
    continue_stream,
)


class Inbox:
    def __init__(self, bus: Bus, consumer: str, cancel_replay_ms: int = 60_000):
        self.bus, self.consumer = bus, consumer
        self.cancel_replay_ms = cancel_replay_ms
        self.continue_stream = continue_stream(consumer)
        self.cancel_group = f"cancel-{consumer}"
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._feeders: list[asyncio.Task] = []

    def start(self) -> None:
        self._feeders = [asyncio.create_task(self._feed(GENERATE_STREAM, "verifier", Generate)),
                         asyncio.create_task(self._feed(CANCEL_STREAM, self.cancel_group, Cancel | Preempt,
                                                        self.cancel_replay_ms)),
                         asyncio.create_task(self._feed(self.continue_stream, "verifier", Continue))]

    def feeding(self) -> bool:
        """False once a feed has ended: the bus closed. A feed that failed raises its error here."""
        for task in self._feeders:
            if task.done():
                task.result()
                return False
        return True

    async def receive(self, block: bool) -> list[Delivery]:
        """What has arrived; with `block`, waits for something up to 0.5 s (so that the caller, idle, still sees
        a cancellation or the bus closing)."""
        out = []
        if block and self._queue.empty():
            try:
                async with asyncio.timeout(0.5):
                    out.append(await self._queue.get())
            except TimeoutError:
                return out
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def stop(self) -> list[Delivery]:
        """Stop reading; returns what was received and not yet handed out (unacknowledged, like anything read)."""
        for task in self._feeders:
            task.cancel()
        await asyncio.gather(*self._feeders, return_exceptions=True)
        return await self.receive(block=False)

    async def delete_own(self) -> None:
        """Remove this replica's Continue stream (with any Continue still in it) and its Cancel group, and its name
        from the shared Generate group if nothing is pending on it (what is pending waits there for a takeover)."""
        await self.bus.delete_stream(self.continue_stream)
        await self.bus.delete_group(CANCEL_STREAM, self.cancel_group)
        await self.bus.forget_consumer(GENERATE_STREAM, "verifier", self.consumer)

    async def _feed(self, stream: str, group: str, type, replay_ms: int | None = None) -> None:
        async for delivery in self.bus.consume(stream, group, self.consumer, type, replay_ms=replay_ms):
            await self._queue.put(delivery)
