"""Admission: how many requests the gateway lets through to the verifier at once, and who goes next.

A bounded queue in front of a bounded set of running slots. Beyond `max_running` requests wait; beyond
`max_queued` waiting ones the gateway answers 503 at once (shedding load early is kinder than a timeout). Which
waiting request is admitted next is a `SchedulingPolicy`: `fcfs` here, `slo` (least slack first) in slo_policy.py.
A policy also hears how admitted requests go (admitted, tokens so far, finished, released), which the SLO policy
learns its estimates from. Plain Python: no aiohttp, so policies are unit-tested with hand-built tickets.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Sequence

from specrelay.services.gateway.scheduling import FcfsPolicy, SchedulingPolicy, Ticket
from specrelay.services.gateway.slo_policy import SloPolicy, SloPolicyConfig

__all__ = ["Admission", "AdmissionFull", "FcfsPolicy", "POLICIES", "SchedulingPolicy", "SloPolicy", "Ticket",
           "make_policy"]


class AdmissionFull(Exception):
    """The waiting queue is at `max_queued`."""


class Admission:
    def __init__(self, policy: SchedulingPolicy, max_running: int, max_queued: int):
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"admission: max_running must be >= 1 and max_queued >= 0, got {max_running}, "
                             f"{max_queued}")
        self.policy = policy
        self.max_running = max_running
        self.max_queued = max_queued
        self._running: dict[str, Ticket] = {}  # by request id: progress reports name the request
        self._waiting: list[tuple[Ticket, asyncio.Future[None]]] = []

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _start(self, ticket: Ticket) -> None:
        self._running[ticket.request_id] = ticket
        self.policy.admitted(ticket)

    async def admit(self, ticket: Ticket) -> None:
        """Returns once `ticket` holds a running slot (pair with `release`); raises AdmissionFull at once when
        it would have to wait in a full queue."""
        if self.num_running < self.max_running and not self._waiting:
            self._start(ticket)
            return
        if len(self._waiting) >= self.max_queued:
            raise AdmissionFull(f"{len(self._waiting)} requests are already waiting")
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (ticket, granted)
        self._waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(ticket)  # the slot was handed over as we were cancelled: pass it on
            else:
                self._waiting.remove(entry)
            raise

    def release(self, ticket: Ticket) -> None:
        """`ticket`'s slot is free: hand it (and any other free slot) to the waiting request the policy picks."""
        if self._running.pop(ticket.request_id, None) is not None:
            self.policy.released(ticket)
        while self._waiting and self.num_running < self.max_running:
            waiter, granted = self._waiting.pop(self.policy.pick([t for t, _ in self._waiting]))
            if not granted.done():
                self._start(waiter)
                granted.set_result(None)

    def progress(self, request_id: str, num_tokens: int) -> None:
        """A running request has produced `num_tokens` output tokens so far."""
        if (ticket := self._running.get(request_id)) is not None:
            self.policy.progress(ticket, num_tokens)

    def finished(self, request_id: str, num_tokens: int, completed: bool) -> None:
        """A running request's generation ended (`completed`: at its own stop or length, not cancelled)."""
        if (ticket := self._running.get(request_id)) is not None:
            self.policy.finished(ticket, num_tokens, completed)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        await self.admit(ticket)
        try:
            yield
        finally:
            self.release(ticket)


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FcfsPolicy, "slo": SloPolicy}


def make_policy(name: str, slo_specs: Sequence[str] = ()) -> SchedulingPolicy:
    """The policy `--schedule NAME` selects; `slo_specs` (`--class-slo`) override the SLO policy's class targets."""
    if name == "slo":
        return SloPolicy(SloPolicyConfig.from_specs(slo_specs))
    return POLICIES[name]()
