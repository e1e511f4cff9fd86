"""Preempted requests: running requests the gateway's SLO schedule paused (`Preempt`) to give their batch slot to
one that could not wait, until it lets them go on (`Preempt(resume=True)`).

The hold machinery's idea (held.py) for a request that has not finished: the engine keeps the request — its
tokens, its sampling generator — out of the batch, and its KV stays in its block table. What becomes of that KV
while it waits is the PTE retention policy's call (services/toolcoord/retention.py, the one that prices client
tool pauses): keep it resident, offload it to the kvstore (the prefix cache) or drop it, priced on how long
preemptions of this server have lasted (learned under the pseudo tool name `PAUSE_NAME`). A kept request is also
evicted, offloaded or dropped, when an admission needs its blocks. Whatever became of the KV, the request goes on
with the same output: what left is loaded back or prefilled again before its next decode step.

Plain Python: the scheduler plans the releases, the service and the engine move the KV.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from specrelay.services.toolcoord.retention import MemoryState, PausedConversation, Retention

PAUSE_NAME = "(preempted)"  # what the retention policy learns preemption pauses under


@dataclass
class PausedRun:
    serving: Any  # the scheduler's Serving record, back in `running` when it goes on
    paused_s: float
    kv: Any = None  # the engine's paused request, once the engine has paused it
    num_tokens: int = 0  # prompt + output so far
    num_blocks: int = 0  # blocks its KV holds now (0 once released)
    decided: bool = False  # the retention policy has had its say
    resume: bool = False  # the gateway let it go on: it waits for a batch slot and blocks

    @property
    def kept(self) -> bool:
        return self.num_blocks > 0


class PausedRuns:
    """Preempted requests by request id, in the order they were paused."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._runs: OrderedDict[str, PausedRun] = OrderedDict()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def pause(self, request_id: str, serving: Any) -> None:
        self._runs[request_id] = PausedRun(serving, self.clock())

    def paused_by_engine(self, request_id: str, kv: Any, num_tokens: int, num_blocks: int) -> None:
        if (run := self._runs.get(request_id)) is not None:
            run.kv, run.num_tokens, run.num_blocks = kv, num_tokens, num_blocks

    def get(self, request_id: str) -> PausedRun | None:
        return self._runs.get(request_id)

    def take(self, request_id: str) -> PausedRun | None:
        return self._runs.pop(request_id, None)

    def ready(self) -> list[tuple[str, PausedRun]]:
        """Those the gateway let go on, longest paused first."""
        return [(rid, run) for rid, run in self._runs.items() if run.resume and run.kv is not None]

    def take_all(self) -> list[tuple[str, PausedRun]]:
        runs, self._runs = list(self._runs.items()), OrderedDict()
        return runs

    def num_blocks(self) -> int:
        return sum(run.num_blocks for run in self._runs.values())

    # -- what becomes of the KV --------------------------------------------------------------------------------

    def decide(self, policy: Any, memory_bytes_used: int) -> list[tuple[Any, Retention]]:
        """The retention policy's keep / offload / drop for each newly paused request; returns (kv, OFFLOAD | DROP)
        for those that leave the device now. Without a policy every paused request is kept."""
        out = []
        for rid, run in self._runs.items():
            if run.decided or run.kv is None:
                continue
            run.decided = True
            if policy is None or run.resume:
                continue
            memory = MemoryState(used_bytes=memory_bytes_used)
            action = policy.decide(self._conversation(rid, run), memory).action
            if action is not Retention.KEEP:
                out.append((run.kv, action))
                run.num_blocks = 0
        return out

    def evict(self, blocks_needed: int, policy: Any, memory_bytes_used: int,
              bytes_per_block: int) -> list[tuple[Any, Retention]]:
        """Kept paused requests to move out so that `blocks_needed` more blocks are free: the policy's cheapest per
        byte first (without one: the most recently paused first, offloaded when a kvstore is there)."""
        kept = {rid: run for rid, run in self._runs.items() if run.kept and run.kv is not None}
        if not kept or blocks_needed <= 0:
            return []
        if policy is None:
            order = [(rid, Retention.OFFLOAD) for rid in reversed(kept)]
        else:
            memory = MemoryState(used_bytes=memory_bytes_used)
            convs = [self._conversation(rid, run) for rid, run in kept.items()]
            order = [(d.conversation_id, d.action)
                     for d in policy.choose_evictions(convs, memory, blocks_needed * bytes_per_block)]
        out, freed = [], 0
        for rid, action in order:
            if freed >= blocks_needed:
                break
            run = kept[rid]
            out.append((run.kv, action))
            freed, run.num_blocks = freed + run.num_blocks, 0
        return out

    def resumed(self, policy: Any, run: PausedRun) -> None:
        """A paused request goes on: the policy learns how long this preemption lasted."""
        if policy is not None:
            policy.observe_pause((PAUSE_NAME,), max(0.0, self.clock() - run.paused_s))

    def _conversation(self, rid: str, run: PausedRun) -> PausedConversation:
        return PausedConversation(rid, run.num_tokens, (PAUSE_NAME,), max(0.0, self.clock() - run.paused_s))
