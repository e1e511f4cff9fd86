"""Admission: how many requests the gateway lets through to the verifier at once, and who goes next.

A bounded queue in front of a bounded set of running slots. Beyond `max_running` requests wait; beyond
`max_queued` waiting ones the gateway answers 503 at once (shedding load early is kinder than a timeout). Which
waiting request is admitted next is a `SchedulingPolicy`: `fcfs` here, `slo` (least slack first) in slo_policy.py.
A policy also hears how admitted requests go (admitted, tokens so far, finished, released), which the SLO policy
learns its estimates from. A policy may also take a slot back (`preempt`, the SLO policy's): the paused request waits
again, with no handler waiting on it — its stream just goes quiet — and `on_preempt(request_id, resume)` tells the
verifier to pause it and, once the policy picks it again, to go on. Plain Python: no aiohttp, so policies are
unit-tested with hand-built tickets.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Sequence

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
        # a preempted request waits with no future: nobody awaits its admission, its handler is streaming
        self._waiting: list[tuple[Ticket, asyncio.Future[None] | None]] = []
        self.on_preempt: Callable[[str, bool], None] | None = None  # (request id, resume): tell the verifier

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
        self._preempt()
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
        paused = [i for i, (t, f) in enumerate(self._waiting) if f is None and t.request_id == ticket.request_id]
        if self._running.pop(ticket.request_id, None) is not None or paused:
            self._waiting = [e for i, e in enumerate(self._waiting) if i not in paused]
            self.policy.released(ticket)
        self._grant()

    def _grant(self) -> None:
        """Free slots to the waiting requests the policy picks; a preempted one goes on."""
        while self._waiting and self.num_running < self.max_running:
            waiter, granted = self._waiting.pop(self.policy.pick([t for t, _ in self._waiting]))
            if granted is None:
                self._running[waiter.request_id] = waiter
                self.policy.unpaused(waiter)
                self.on_preempt(waiter.request_id, True)
            elif not granted.done():
                self._start(waiter)
                granted.set_result(None)

    def _preempt(self) -> None:
        """A waiting request that cannot wait takes the slot of the running request the policy pauses."""
        if self.on_preempt is None or not self._waiting or self.num_running < self.max_running:
            return
        victim = self.policy.preempt([t for t, _ in self._waiting], list(self._running.values()))
        if victim is None or (ticket := self._running.pop(victim, None)) is None:
            return
        self.policy.paused(ticket)
        self._waiting.append((ticket, None))
        self.on_preempt(victim, False)
        self._grant()

    def progress(self, request_id: str, num_tokens: int) -> None:
        """A running request has produced `num_tokens` output tokens so far."""
        if (ticket := self._ticket(request_id)) is not None:
            self.policy.progress(ticket, num_tokens)
            self._preempt()  # slack shrinks as time passes: a waiting request may no longer afford to wait

    def finished(self, request_id: str, num_tokens: int, completed: bool) -> None:
        """A running request's generation ended (`completed`: at its own stop or length, not cancelled)."""
        if (ticket := self._ticket(request_id)) is not None:
            self.policy.finished(ticket, num_tokens, completed)

    def _ticket(self, request_id: str) -> Ticket | None:
        """A running request's ticket, or a paused one's (its last tokens may still arrive)."""
        if (ticket := self._running.get(request_id)) is not None:
            return ticket
        return next((t for t, f in self._waiting if f is None and t.request_id == request_id), None)

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
