"""How a stand-alone service stops: Ctrl-C or SIGTERM (docker stop, Kubernetes) cancels its serving task, so that
the task's own cleanup runs while the bus is still open — a verifier gives back its KV, and every service takes its
pid-named consumer out of the shared groups it read (`leave`), which would otherwise pile up across restarts."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Coroutine

from specrelay.shared.bus import Bus

log = logging.getLogger(__name__)


async def serve_until_stopped(serving: Coroutine) -> None:
    """Run `serving`; SIGTERM cancels it as Ctrl-C does. Returns once it has stopped and cleaned up."""
    task = asyncio.ensure_future(serving)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():  # Ctrl-C: asyncio.run goes on to raise KeyboardInterrupt
            raise


async def leave(bus: Bus, stream: str, group: str, consumer: str, own_group: bool = False) -> None:
    """A stopped consumer's last word: its name out of a shared `group`, unless messages are pending on it (another
    consumer claims those from there), or the whole group when it was this consumer's alone (`own_group`).
    Failures are logged, not raised: the service is stopping either way."""
    if bus.closed:
        return
    try:
        if own_group:
            await bus.delete_group(stream, group)
        elif not await bus.forget_consumer(stream, group, consumer):
            log.info("%s stays in group %s of %s: messages are pending on it", consumer, group, stream)
    except Exception:
        log.exception("could not leave group %s of %s as %s", group, stream, consumer)
