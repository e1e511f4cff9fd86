"""Admission: how many requests the gateway lets through to the verifier at once, and who goes next.

A bounded queue in front of a bounded set of running slots. Beyond `max_running` requests wait; beyond
`max_queued` waiting ones the gateway answers 503 at once (shedding load early is kinder than a timeout). Which
waiting request is admitted next is a `SchedulingPolicy`: `fcfs` here; SLO-aware policies (issue 9) implement the
same `pick`. Plain Python: no aiohttp, so policies are unit-tested with hand-built tickets.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import AsyncIterator, Sequence


@dataclass(frozen=True)
class Ticket:
    """What a policy may know about a waiting request."""

    request_id: str
    slo_class: str
    arrival_s: float  # time.monotonic() at arrival
    deadline_s: float | None  # monotonic seconds by which the whole response is due; None: no deadline
    num_prompt_tokens: int
    max_tokens: int


class SchedulingPolicy(ABC):
    name: str

    @abstractmethod
    def pick(self, waiting: Sequence[Ticket]) -> int:
        """Index into `waiting` (in arrival order, never empty) of the request to admit next."""


class FcfsPolicy(SchedulingPolicy):
    name = "fcfs"

    def pick(self, waiting: Sequence[Ticket]) -> int:
        return 0


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FcfsPolicy}


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
        self.num_running = 0
        self._waiting: list[tuple[Ticket, asyncio.Future[None]]] = []

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def admit(self, ticket: Ticket) -> None:
        """Returns once `ticket` holds a running slot (pair with `release`); raises AdmissionFull at once when
        it would have to wait in a full queue."""
        if self.num_running < self.max_running and not self._waiting:
            self.num_running += 1
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
                self.release()  # the slot was handed over as we were cancelled: pass it on
            else:
                self._waiting.remove(entry)
            raise

    def release(self) -> None:
        self.num_running -= 1
        while self._waiting and self.num_running < self.max_running:
            ticket, granted = self._waiting.pop(self.policy.pick([t for t, _ in self._waiting]))
            if not granted.done():
                self.num_running += 1
                granted.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        await self.admit(ticket)
        try:
            yield
        finally:
            self.release()
