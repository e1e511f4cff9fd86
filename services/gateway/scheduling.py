"""The scheduling interface: what a policy knows about a waiting request (`Ticket`), how it chooses (`pick`), and
what it hears about admitted requests. `fcfs` lives here; `slo` in slo_policy.py; admission.py applies them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence


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

    def preempt(self, waiting: Sequence[Ticket], running: Sequence[Ticket]) -> str | None:
        """The request id of a running request to pause so that a waiting one can go now, or None (never, by
        default). A paused request waits among the others and goes on when `pick` chooses it."""
        return None

    # Feedback from the request path; a policy that learns nothing ignores it.
    def admitted(self, ticket: Ticket) -> None:
        """`ticket` now holds a running slot."""

    def progress(self, ticket: Ticket, num_tokens: int) -> None:
        """`num_tokens` output tokens of `ticket` have arrived so far."""

    def finished(self, ticket: Ticket, num_tokens: int, completed: bool) -> None:
        """Generation ended after `num_tokens`; `completed`: it reached its own end (not cancelled or failed)."""

    def paused(self, ticket: Ticket) -> None:
        """`ticket` was preempted: its slot is taken, it waits again (having produced some tokens)."""

    def unpaused(self, ticket: Ticket) -> None:
        """A preempted `ticket` holds a running slot again."""

    def released(self, ticket: Ticket) -> None:
        """`ticket`'s slot is free again (always called, whatever happened)."""


class FcfsPolicy(SchedulingPolicy):
    name = "fcfs"

    def pick(self, waiting: Sequence[Ticket]) -> int:
        return 0
