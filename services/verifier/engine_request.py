"""One request as the engine runs it, and what the engine reports of it: a step's output for the drafter, and the
scheduler's RequestOutput (handoffs.py) with the tokens and logprobs a step committed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from specrelay.services.drafter.base import Verified
from specrelay.services.verifier.handoffs import RequestOutput, SpecStats
from specrelay.shared.messages import TokenLogprob
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.sampling import SamplingParams


@dataclass(eq=False)  # a request is itself: `r in requests` by identity (value equality made it O(n²))
class Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    table: BlockTable = field(default_factory=BlockTable)
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    finish_reason: str | None = None  # "stop" | "length"
    name: str = ""  # the scheduler's request id
    keep_kv: bool = False  # finished, its KV stays until `release`
    logprobs: list[TokenLogprob] | None = None  # one per output token, when the request asked for them

    def __post_init__(self):
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class StepOutput:
    new_tokens: dict[int, list[int]] = field(default_factory=dict)  # request id -> tokens committed this step
    finished: list[Request] = field(default_factory=list)
    verified: list[Verified] = field(default_factory=list)  # feedback for the drafter


def request_output(req: Request, start: int | None = None, started: bool = False) -> RequestOutput:
    """What the scheduler learns of a request after a step: its tokens from output index `start` on (None: none)."""
    new = slice(start, None) if start is not None else slice(0, 0)
    out = RequestOutput(req.name, req.output[new], len(req.table.blocks), req.finish_reason,
                        cached_tokens=req.stats.cached_tokens if started else None,
                        logprobs=req.logprobs[new] if req.logprobs is not None else None)
    if req.finish_reason is not None:
        out.kv = req if req.finish_reason != "cancelled" else None  # a cancelled request's KV is freed already
        out.num_prompt_tokens, out.output, out.stats = len(req.prompt), list(req.output), dataclasses.replace(req.stats)
    return out


def failed_output(name: str, error: str) -> RequestOutput:
    return RequestOutput(name, finish_reason="error", error=error)
