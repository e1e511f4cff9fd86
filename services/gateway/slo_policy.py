"""`--schedule slo`: admit the waiting request with the least slack among those that can still meet their SLO.

Slack of a waiting request at time `now` (all in seconds; L̂ = predicted output tokens, see slo_estimator.py):

    slack = min( arrival + ttft_target − now − t̂_first,                 (first token in time, if the class has TTFT)
                 deadline − now − t̂_first − L̂ · t̂_tpot )               (whole response in time)

where t̂_first and t̂_tpot are the measured first-token delay and time per output token. A request without a
deadline gets one from its class: `arrival + e2e` if the class has an E2E target, else `arrival + ttft + L̂ · tpot`
(the pace the class promises); a class with no target at all (batch) has infinite slack.

Order (least laxity first, with the hopeless set aside, as JITServe does to keep goodput under overload):
1. slack ≥ 0: least slack first — the request that can least afford to wait goes now.
2. slack < 0: it will miss whatever we do; serving it ahead of one that can still make it only turns one miss into
   two. These go only when no feasible request waits, oldest first.
3. Aging bound: a request that has waited `aging_s` is *aged*. The oldest aged request goes whenever the neediest
   feasible request can wait for the next slot to free (its slack exceeds the predicted time until a running
   request finishes — running requests' predictions are refined by the tokens they have produced), and at least
   every `aged_every`-th pick regardless. So a hopeless or a batch request is never starved: once aged it is served
   at a rate of at least one pick in `aged_every`, oldest first.

The gateway's `max_running` slots are the verifier's batch (`specrelay serve` keeps it at or below the verifier's
batch size), so admission order is batch composition.

Preemption (`preempt`): a slot can also be taken back. When a feasible waiting request (slack ≥ 0) cannot wait for
the next slot to free (its slack is below the predicted time until a running request ends), the running request
with the most slack is paused (`Preempt` to the verifier, which keeps its KV or lets the PTE retention policy offload
or drop it: services/verifier/preempted.py), and the freed slot goes to the waiting request `pick` chooses. A paused
request waits among the others with its own slack — computed from what it has produced so far — and goes on
(`Preempt(resume=True)`) when picked, with the same output as if never paused. It is paused only if its slack,
less that predicted wait, stays above `preempt_margin_s` and the waiter's own slack; at most `max_preemptions`
times; never once aged. A hopeless request never preempts anyone, and a batch request (no target, infinite
slack) is always the first to yield. The decision lives here because only the gateway knows deadlines and slack;
the verifier decides what becomes of the paused KV, because only it knows its blocks.
Plain Python; the clock is injectable for tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from specrelay.services.gateway.scheduling import SchedulingPolicy, Ticket
from specrelay.services.gateway.slo_estimator import Estimator, EstimatorConfig
from specrelay.shared.slo import DEFAULT_SLOS, Slo, parse_slo_specs


@dataclass(frozen=True)
class SloPolicyConfig:
    # Per-class targets in the loadgen's `--slo` language, so that a server and a sweep are configured with the same
    # strings (`interactive:ttft=1s,tpot=100ms`, `deadline:e2e=30s`).
    targets: dict[str, Slo] = field(default_factory=lambda: dict(DEFAULT_SLOS))
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    aging_s: float = 20.0
    aged_every: int = 4
    preempt_margin_s: float = 1.0  # slack a paused request must keep beyond its predicted pause
    max_preemptions: int = 2  # per request: a request is not paused again and again

    def __post_init__(self):
        if not self.aging_s > 0 or self.aged_every < 1:
            raise ValueError(f"slo policy: aging_s must be > 0 and aged_every >= 1, got {self.aging_s}, "
                             f"{self.aged_every}")

    @classmethod
    def from_specs(cls, specs: Sequence[str]) -> "SloPolicyConfig":
        return cls(targets=parse_slo_specs(list(specs)))


class SloPolicy(SchedulingPolicy):
    name = "slo"

    def __init__(self, config: SloPolicyConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or SloPolicyConfig()
        self.clock = clock
        self.estimator = Estimator(self.config.estimator)
        self.running: dict[str, Ticket] = {}
        self.paused_ids: set[str] = set()  # preempted, waiting to go on
        self.preemptions: dict[str, int] = {}  # times each admitted request has been paused
        self.picks_since_aged = 0

    # --- slack --------------------------------------------------------------------------------------------------

    def slack_s(self, t: Ticket, now_s: float) -> float:
        """Of a waiting request, or of a running or paused one from what it has produced so far."""
        target = self.config.targets.get(t.slo_class, Slo())
        est = self.estimator
        done = est.generated(t.request_id)
        left = est.output_tokens(t.slo_class, t.max_tokens, done) - done
        first_s = est.first_token_s if done == 0 else 0.0
        slack = math.inf
        if target.ttft_ms is not None and done == 0:
            slack = t.arrival_s + target.ttft_ms / 1000 - now_s - first_s
        due = t.deadline_s
        if due is None and target.e2e_ms is not None:
            due = t.arrival_s + target.e2e_ms / 1000
        if due is None and target.ttft_ms is not None and target.tpot_ms is not None:
            out = est.output_tokens(t.slo_class, t.max_tokens)
            due = t.arrival_s + (target.ttft_ms + out * target.tpot_ms) / 1000
        if due is not None:
            slack = min(slack, due - now_s - first_s - left * est.tpot_s)
        return slack

    def next_free_s(self, now_s: float) -> float:
        """Predicted time until the first running request finishes (0 when none runs)."""
        return min((self.estimator.remaining_s(rid, t.slo_class, t.max_tokens, now_s)
                    for rid, t in self.running.items()), default=0.0)

    # --- the decision -------------------------------------------------------------------------------------------

    def pick(self, waiting: Sequence[Ticket]) -> int:
        now = self.clock()
        slacks = [self.slack_s(t, now) for t in waiting]
        feasible = [i for i, s in enumerate(slacks) if s >= 0]
        neediest = min(feasible, key=lambda i: slacks[i]) if feasible else None
        aged = [i for i, t in enumerate(waiting) if now - t.arrival_s >= self.config.aging_s]
        if aged:
            oldest = min(aged, key=lambda i: waiting[i].arrival_s)
            turn_due = self.picks_since_aged + 1 >= self.config.aged_every
            can_wait = neediest is not None and slacks[neediest] > self.next_free_s(now)
            if neediest is None or neediest == oldest or turn_due or can_wait:
                self.picks_since_aged = 0
                return oldest
        self.picks_since_aged += 1
        if neediest is not None:
            return neediest
        return min(range(len(waiting)), key=lambda i: waiting[i].arrival_s)

    def preempt(self, waiting: Sequence[Ticket], running: Sequence[Ticket]) -> str | None:
        """The running request to pause for a waiting one that cannot wait (see the module's Preemption), or
        None."""
        now, cfg = self.clock(), self.config
        wait_s = self.next_free_s(now)
        slacks = [self.slack_s(t, now) for t in waiting if t.request_id not in self.paused_ids]
        if not any(0 <= s < wait_s for s in slacks):
            return None
        need_s = min(s for s in slacks if s >= 0)
        best, best_slack = None, -math.inf
        for t in running:
            if self.preemptions.get(t.request_id, 0) >= cfg.max_preemptions or now - t.arrival_s >= cfg.aging_s:
                continue
            slack = self.slack_s(t, now)
            # it stays out until a slot frees again, and must still make its own SLO with margin to spare
            if slack - wait_s >= max(cfg.preempt_margin_s, need_s) and slack > best_slack:
                best, best_slack = t.request_id, slack
        if best is not None:
            self.preemptions[best] = self.preemptions.get(best, 0) + 1
        return best

    # --- feedback from the request path -------------------------------------------------------------------------

    def admitted(self, ticket: Ticket) -> None:
        self.running[ticket.request_id] = ticket
        self.estimator.admitted(ticket.request_id, self.clock())

    def progress(self, ticket: Ticket, num_tokens: int) -> None:
        self.estimator.progress(ticket.request_id, num_tokens, self.clock())

    def finished(self, ticket: Ticket, num_tokens: int, completed: bool) -> None:
        self.estimator.finished(ticket.request_id, ticket.slo_class, ticket.max_tokens, num_tokens, completed)

    def paused(self, ticket: Ticket) -> None:
        self.running.pop(ticket.request_id, None)
        self.paused_ids.add(ticket.request_id)

    def unpaused(self, ticket: Ticket) -> None:
        self.running[ticket.request_id] = ticket
        self.paused_ids.discard(ticket.request_id)
        self.estimator.resumed(ticket.request_id, self.clock())

    def released(self, ticket: Ticket) -> None:
        self.running.pop(ticket.request_id, None)
        self.paused_ids.discard(ticket.request_id)
        self.preemptions.pop(ticket.request_id, None)
        self.estimator.forget(ticket.request_id)
