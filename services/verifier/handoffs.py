"""What the verifier's scheduler, engine and service hand each other, once per step (as vLLM v1's
`SchedulerOutput` and `ModelRunnerOutput`).

    Scheduler.schedule() -> StepPlan      what this step does (scheduler.py, plain Python)
    service                               acknowledgements, error answers, KV to and from the kvstore
    SpecEngine.execute(plan) -> StepResult   the forward passes (engine.py)
    Scheduler.update(result) -> [Reply]   what the service sends, and what becomes of finished requests' KV

Plain Python: no torch, bus or Redis here. KV is named by opaque handles (`kv`: the engine's finished request, or a
block table claimed for a Generate) that only the engine and the KV stores look into; messages (`delivery.msg`) are
read by attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecStats:
    cached_tokens: int = 0  # prompt tokens whose KV was loaded, not prefilled
    steps: int = 0
    accepted_tokens: int = 0  # draft tokens the target accepted
    drafted_tokens: int = 0  # tree nodes verified, roots excluded
    draft_s: float = 0.0
    verify_s: float = 0.0
    by_proposer: dict[str, list[int]] = field(default_factory=dict)  # proposer -> [accepted, drafted] tokens

    def credit(self, sources: list[str], accepted_nodes: list[int]) -> None:
        """Count a verified tree's nodes (sources[i]: node i's proposer, the root's "") and accepted ones."""
        for source in sources[1:]:
            self.by_proposer.setdefault(source, [0, 0])[1] += 1
        for i in accepted_nodes:
            self.by_proposer[sources[i]][0] += 1

    @property
    def mean_accepted_tokens(self) -> float:
        """Accepted draft tokens per verify step (the bonus/recovered token not counted)."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


# -- the plan ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reject:
    delivery: Any  # a Generate or Continue that cannot run anywhere: answered with an error chunk, acknowledged
    error: str


@dataclass(frozen=True)
class Release:
    kv: Any  # the engine's finished request, or a claimed block table
    # True: saved to the prefix cache first, so that a later prompt that starts the same way loads it (an expired
    # or released hold, a conversation the retention policy offloads); False: freed unpublished
    publish: bool


@dataclass(frozen=True)
class Resume:
    """A Continue that goes on now: its held request is extended by `token_ids`, and only those are prefilled."""

    request_id: str
    kv: Any  # the held request; its table holds the conversation's KV
    token_ids: list[int]
    sampling: Any  # the turn's SamplingSpec


@dataclass(frozen=True)
class Unpause:
    """A preempted request that goes on now. Its KV was kept (`reload` False: it decodes on as if never paused)
    or released (`reload`: the service loads what the prefix cache has of it, the engine prefills the rest)."""

    request_id: str
    kv: Any  # the engine's paused request
    reload: bool


@dataclass
class Admit:
    """A Generate that starts now. The service's load stage fills `table`, `cached_tokens` and `relay` from the
    kvstore before the engine prefills the rest."""

    request_id: str
    prompt: list[int]
    sampling: Any  # SamplingSpec
    table: Any = None  # KV kept for its conversation across a client tool pause (claimed by prefix), else None
    cached_tokens: int = 0  # prompt tokens loaded from the prefix cache (usage reports relayed ones apart)
    relay: Any = None  # RelayUsage: what the prefill reused of earlier requests' outputs


@dataclass
class StepPlan:
    # Done by the service before the engine runs. The admissions below count the releases' blocks as free.
    acks: list[Any] = field(default_factory=list)  # acknowledged unanswered: Cancels, and what their sender gave up
    rejects: list[Reject] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)  # KV leaving the device: expiries, cancels, evictions
    # Run by the engine, in this order.
    cancelled: list[str] = field(default_factory=list)  # running or paused requests stopped now (KV freed)
    paused: list[str] = field(default_factory=list)  # running requests preempted now: out of the batch, KV kept
    unpaused: list[Unpause] = field(default_factory=list)  # preempted requests back in the batch
    resumes: list[Resume] = field(default_factory=list)  # Continues first: their KV is already here
    admits: list[Admit] = field(default_factory=list)  # then new Generates, in arrival order
    # One speculative step over every running request. Never in a step that prefills: a first token goes out as
    # soon as it exists, not after a draft round trip and a verify.
    decode: bool = False

    @property
    def runs_engine(self) -> bool:
        return bool(self.cancelled or self.paused or self.unpaused or self.resumes or self.admits or self.decode)


# -- the result ----------------------------------------------------------------------------------------------------


@dataclass
class RequestOutput:
    request_id: str
    new_tokens: list[int] = field(default_factory=list)  # committed this step, in order
    num_blocks: int = 0  # KV blocks it holds after the step (the scheduler's block budget)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # finish_reason "error": why; the request alone failed and its KV is freed
    cached_tokens: int | None = None  # set the step it starts: context tokens whose KV it did not prefill
    logprobs: list[Any] | None = None  # TokenLogprob per new token, when the request asked for logprobs
    # Set when it finished:
    kv: Any = None  # "stop" / "length": the engine's request, its KV kept for the scheduler to hold or release
    num_prompt_tokens: int = 0
    output: list[int] = field(default_factory=list)  # the turn's whole output (usage; the relay index)
    stats: SpecStats | None = None


@dataclass(frozen=True)
class PausedOutput:
    kv: Any  # the engine's paused request: its table holds the KV (released by a Release like any other)
    num_tokens: int  # prompt + output so far
    num_blocks: int


@dataclass
class StepResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    paused: dict[str, PausedOutput] = field(default_factory=dict)  # by request id: the plan's pauses, done
    decoded: bool = False  # a decode step ran: every request running in it has an output
    # For the drafter service: what the step verified (empty when no tree came), engine id -> request id, and the
    # requests it may forget.
    verified: list[Any] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)


# -- what the service sends ----------------------------------------------------------------------------------------


@dataclass
class Serving:
    """A request this replica serves: the scheduler's record, read by the service when it answers."""

    delivery: Any  # its Generate or Continue; acknowledged once the last chunk is out
    first_turn: bool  # a Generate; False: a Continue of a held request
    ledger: Any  # usage over the request's turns (ledger.py); a Continue carries its held request's on
    sent: int = 0  # output tokens already published
    num_blocks: int = 0  # KV blocks the engine last reported
    carried: int = 0  # context tokens a held table brought to this turn
    cached_tokens: int = 0  # prompt tokens loaded from the prefix cache
    relay: Any = None  # RelayUsage of its prefill

    @property
    def msg(self) -> Any:
        return self.delivery.msg


@dataclass
class Reply:
    """One chunk for the service to send after a step."""

    serving: Serving
    token_ids: list[int]
    offset: int
    finish_reason: str | None = None
    error: str | None = None
    turn: RequestOutput | None = None  # finished: what the engine reported (usage, the relay index)
    held: bool = False  # its KV is held for a Continue: the chunk names this replica
    release: Release | None = None  # its KV, published and freed once the turn is recorded
    logprobs: list[Any] | None = None  # TokenLogprob per token of token_ids (the service fills it from the step)
