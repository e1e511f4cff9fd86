"""One policy over a tool-integrated workload: real forwards on the verifier engine, tool pauses on a virtual clock.

The clock (`now`, seconds) is the run's wall time as a server would see it if every pause were really waited:
each loop iteration does real work (admissions with their KV reloads and prefills, one batched decode step,
offloads) and the clock advances by that iteration's measured elapsed time; when nothing can run (every
conversation is paused or waiting on one that is) the clock jumps to the next pause's end. So

    wall_s = compute_s (real, measured) + idle_s (stretches where every trajectory was in a tool pause)

and pauses cost nothing to simulate: a 10 s human pause costs the run 10 s only if nothing else could compute
meanwhile, exactly as with real sleeps. A trajectory's `latency_s` is the time it spent waiting on the model — from
each turn becoming ready (arrival or the end of its pause) to the turn's last token, queueing included — its own
tool pauses excluded (PTE prices model work, not tools: arXiv 2604.05404).

Policies at each pause (and whenever an admission needs blocks):
  * drop: release the KV; the next turn prefills the whole context again (a stateless server).
  * keep: hold every conversation's KV across pauses. The cache is not bounded by the budget for this policy: it
    shows the peak KV that keeping costs (`peak_kv_bytes`, above the budget).
  * pte / infercept: `RetentionPolicy` / `InferCeptPolicy` decide keep, offload (PrefixCache.save to the kvstore,
    release; the next turn loads the blocks back) or drop, pauses learned per tool name as they end; kept
    conversations are re-decided at `recheck_after_s` and evicted (the policy's choice) when an admission needs
    their blocks. The cache holds exactly the budget, so `peak_kv_bytes` ≤ budget by construction.

Speculation is off (one token per step): the benchmark is about KV across pauses, and plain decoding keeps its
per-step cost easy to read.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

from specrelay.services.kvstore.store import KVStore
from specrelay.services.toolcoord.retention import (
    FixedPolicy,
    InferCeptPolicy,
    MemoryState,
    PausedConversation,
    Retention,
    RetentionConfig,
    RetentionDecision,
    RetentionPolicy,
)
from specrelay.bench.tir_workload import Trajectory
from specrelay.services.verifier.engine import Request, SpecEngine
from specrelay.services.verifier.prefix_cache import PrefixCache
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.pte import PteAccount, PteProfile, TurnTokens
from specrelay.shared.sampling import SamplingParams

POLICIES = ("drop", "keep", "pte", "infercept")


@dataclass
class TrajectoryResult:
    trajectory_id: int
    latency_s: float = 0.0  # waiting on the model, own pauses excluded
    recomputed_tokens: int = 0
    reloaded_tokens: int = 0
    total_tokens: int = 0
    pte: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)  # generated tokens per turn


@dataclass
class PolicyResult:
    policy: str
    wall_s: float
    compute_s: float
    peak_kv_bytes: int
    peak_store_bytes: int
    decisions: dict[str, int]  # at pauses: keep/offload/drop; evictions: evict_offload/evict_drop; rechecks
    trajectories: list[TrajectoryResult]

    @property
    def pte(self) -> float:
        return sum(t.pte for t in self.trajectories)

    @property
    def recomputed_tokens(self) -> int:
        return sum(t.recomputed_tokens for t in self.trajectories)


@dataclass
class _Conv:
    """One trajectory's state in the run."""

    traj: Trajectory
    account: PteAccount
    result: TrajectoryResult
    turn: int = 0
    context: list[int] = field(default_factory=list)  # tokens of the next turn's prompt
    kv_tokens: int = 0  # tokens whose KV existed when the last turn ended (dropped or not)
    table: BlockTable | None = None  # kept KV
    offloaded: bool = False
    ready_at: float = 0.0
    paused_at: float = 0.0
    recheck_at: float | None = None
    request: Request | None = None

    @property
    def decode_tokens(self) -> int:
        t = self.traj
        return t.turns[self.turn].decode_tokens if self.turn < len(t.turns) else t.answer_tokens


def make_policy(name: str, profile: PteProfile, config: RetentionConfig):
    if name == "drop":
        return FixedPolicy(Retention.DROP)
    if name == "keep":
        return FixedPolicy(Retention.KEEP)
    if name == "pte":
        return RetentionPolicy(profile, config)
    if name == "infercept":
        return InferCeptPolicy(profile, config)
    raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")


class TirRun:
    def __init__(self, runner: ModelRunner, store: KVStore, model_id: str, policy_name: str, policy,
                 profile: PteProfile, budget_blocks: int):
        self.runner, self.store, self.policy_name, self.policy = runner, store, policy_name, policy
        self.cache = runner.cache
        self.prefix = PrefixCache(store, model_id, runner.cache)
        self.engine = SpecEngine(runner, proposer=None, adaptive=False)
        self.profile, self.budget_blocks = profile, budget_blocks
        self.bytes_per_block = self.cache.bytes_per_block()
        self.decisions: Counter[str] = Counter()
        self.peak_blocks = self.peak_store_bytes = self.store_used_bytes = 0
        self.now = self.compute_s = 0.0

    # -- the loop: pauses that ended -> rechecks -> admit -> one decode step ------------------------------------
    async def run(self, trajectories: list[Trajectory]) -> PolicyResult:
        convs = [_Conv(t, PteAccount(self.profile), TrajectoryResult(t.trajectory_id, total_tokens=t.total_tokens),
                       context=list(t.prompt)) for t in trajectories]
        ready, paused, running = list(convs), [], {}
        while ready or paused or running:
            t0 = time.perf_counter()
            for c in [c for c in paused if c.ready_at <= self.now]:
                paused.remove(c)
                ready.append(c)
                self.policy.observe_pause([c.traj.turns[c.turn - 1].tool], c.ready_at - c.paused_at)
            ready.sort(key=lambda c: c.ready_at)
            await self._recheck(paused)
            admitted = await self._admit(ready, paused, running)
            finished = self.engine.step().finished if self.engine.running else []
            finished += [c.request for c in admitted if c.request.finish_reason is not None]
            worked = bool(admitted or finished or running)
            self._note_peak()
            elapsed = time.perf_counter() - t0
            if worked:
                self.now += elapsed
                self.compute_s += elapsed
            else:
                self.now = max(self.now + elapsed, self._next_event(paused, ready))
            for req in finished:
                await self._end_turn(running.pop(req.request_id), paused)
        return PolicyResult(self.policy_name, self.now, self.compute_s, self.peak_blocks * self.bytes_per_block,
                            self.peak_store_bytes, dict(self.decisions), [c.result for c in convs])

    def _next_event(self, paused: list[_Conv], ready: list[_Conv]) -> float:
        events = [c.ready_at for c in paused] + [c.recheck_at for c in paused if c.recheck_at is not None]
        if not events:
            raise RuntimeError(f"bench tir: {len(ready)} turns wait for KV blocks that nothing will free "
                               f"(budget {self.budget_blocks} blocks)")
        return min(events)

    # -- admission ---------------------------------------------------------------------------------------------
    async def _admit(self, ready: list[_Conv], paused: list[_Conv], running: dict[int, _Conv]) -> list[_Conv]:
        """First come, first served (no overtaking, so a long context is never starved): each admitted turn gets
        its KV (kept, reloaded, or none) and room for its whole prompt and decode; prefilled together."""
        admitted, tables = [], []
        while ready:
            c = ready[0]
            bs = self.cache.block_size
            need = -(-(len(c.context) + c.decode_tokens) // bs) - (len(c.table.blocks) if c.table else 0)
            # Turns queued behind this one may hold KV kept across their pause too: with nothing running and
            # nothing paused, only evicting theirs can make room (a load-dependent schedule reached that state).
            if need > self._free_blocks(running, admitted, tables) and not await self._evict(
                    need, paused + ready[1:], running, admitted, tables):
                break
            ready.pop(0)
            table, cached = c.table or BlockTable(), 0
            if c.table is not None:
                cached = table.num_tokens
            elif c.offloaded:
                cached = await self.prefix.load(table, c.context)
                c.result.reloaded_tokens += cached
            c.table, c.offloaded, c.recheck_at = None, False, None
            recomputed = c.kv_tokens - cached
            c.account.add(TurnTokens(prefilled_tokens=len(c.context) - c.kv_tokens, decode_tokens=c.decode_tokens,
                                     cached_tokens=cached, recomputed_tokens=recomputed,
                                     tool_response_tokens=len(c.traj.turns[c.turn - 1].response) if c.turn else 0))
            c.result.recomputed_tokens += recomputed
            admitted.append(c)
            tables.append(table)
        if admitted:
            params = [SamplingParams(max_tokens=c.decode_tokens) for c in admitted]
            # keep: the policy, not the engine, decides what happens to a finished turn's KV
            for c, req in zip(admitted, self.engine.add([c.context for c in admitted], params, tables, keep=True)):
                c.request = req
                running[req.request_id] = c
        return admitted

    def _free_blocks(self, running: dict[int, _Conv], admitted: list[_Conv], tables: list[BlockTable]) -> int:
        """Free blocks less what running and just-admitted turns will still claim as they prefill and decode."""
        bs = self.cache.block_size
        owed = sum(-(-(len(c.request.prompt) + c.decode_tokens) // bs) - len(c.request.table.blocks)
                   for c in running.values())
        owed += sum(-(-(len(c.context) + c.decode_tokens) // bs) - len(t.blocks) for c, t in zip(admitted, tables))
        return self.cache.num_free_blocks - owed

    async def _evict(self, need: int, waiting: list[_Conv], running, admitted, tables) -> bool:
        """Free blocks held by kept conversations (paused, or back from their pause but queued) until `need` fit;
        False if they cannot."""
        kept = [c for c in waiting if c.table is not None]
        short = need - self._free_blocks(running, admitted, tables)
        if sum(len(c.table.blocks) for c in kept) < short:
            return False
        by_id = {str(c.traj.trajectory_id): c for c in kept}
        for d in self._evictions(kept, short * self.bytes_per_block):
            await self._apply(by_id[d.conversation_id], d.action, evicted=True)
            if self._free_blocks(running, admitted, tables) >= need:
                return True
        return self._free_blocks(running, admitted, tables) >= need

    def _evictions(self, kept: list[_Conv], bytes_needed: int) -> list[RetentionDecision]:
        paused = [self._paused(c) for c in kept]
        memory = self._memory(None)
        if isinstance(self.policy, RetentionPolicy):
            chosen = self.policy.choose_evictions(paused, memory, bytes_needed)
            return chosen + [RetentionDecision(p.conversation_id, Retention.DROP, {}, math.nan, None)
                             for p in paused if p.conversation_id not in {d.conversation_id for d in chosen}]
        # InferCept evicts the conversations with the longest expected pause first, each as its waste says.
        out = []
        for p in sorted(paused, key=lambda p: -self.policy.pauses.expected_remaining_s(p.tool_names, p.elapsed_s)):
            # A full budget makes preserve infeasible: the answer is swap (offload) or discard (drop).
            full = MemoryState(self.budget_blocks * self.bytes_per_block, memory.kvstore_free_bytes)
            out.append(self.policy.decide(p, full))
        return out

    # -- pauses --------------------------------------------------------------------------------------------------
    async def _end_turn(self, c: _Conv, paused: list[_Conv]) -> None:
        req, c.request = c.request, None
        c.result.outputs.append(list(req.output))
        c.result.latency_s += self.now - c.ready_at
        c.context = req.prompt + req.output
        c.kv_tokens = req.table.num_tokens
        if c.turn == len(c.traj.turns):
            self.engine.release(req)
            c.result.pte = c.account.usage.total
            return
        c.table = req.table
        tool = c.traj.turns[c.turn]
        c.paused_at, c.ready_at = self.now, self.now + tool.pause_s
        c.turn += 1
        decision = self.policy.decide(self._paused(c), self._memory(c))
        await self._apply(c, decision.action)
        if decision.action is Retention.KEEP and decision.recheck_after_s is not None:
            c.recheck_at = self.now + decision.recheck_after_s
        c.context += tool.response  # the tool's answer arrives with the next request
        paused.append(c)

    async def _recheck(self, paused: list[_Conv]) -> None:
        for c in paused:
            if c.table is not None and c.recheck_at is not None and c.recheck_at <= self.now:
                self.decisions["rechecks"] += 1
                d = self.policy.decide(self._paused(c), self._memory(c))
                c.recheck_at = None if d.recheck_after_s is None else self.now + d.recheck_after_s
                if d.action is not Retention.KEEP:
                    await self._apply(c, d.action, evicted=True)

    async def _apply(self, c: _Conv, action: Retention, evicted: bool = False) -> None:
        self.decisions[("evict_" if evicted else "") + action.value] += 1
        if action is Retention.KEEP:
            return
        if action is Retention.OFFLOAD:
            # The context the KV covers: the previous prompt and output, without the tool response appended.
            await self.prefix.save(c.table, c.context[: c.table.num_tokens])
            self.store_used_bytes = (await self.store.stats()).used_bytes
            self.peak_store_bytes = max(self.peak_store_bytes, self.store_used_bytes)
            c.offloaded = True
        self.cache.release(c.table)
        c.table, c.recheck_at = None, None

    def _paused(self, c: _Conv) -> PausedConversation:
        return PausedConversation(str(c.traj.trajectory_id), c.table.num_tokens,
                                  (c.traj.turns[c.turn - 1].tool,), max(0.0, self.now - c.paused_at))

    def _memory(self, c: _Conv | None) -> MemoryState:
        used = self.cache.allocator.num_blocks - self.cache.num_free_blocks
        if c is not None and c.table is not None:
            used -= len(c.table.blocks)
        return MemoryState(used_bytes=used * self.bytes_per_block,
                           kvstore_free_bytes=float(self.store.capacity_bytes - self.store_used_bytes))

    def _note_peak(self) -> None:
        self.peak_blocks = max(self.peak_blocks, self.cache.allocator.num_blocks - self.cache.num_free_blocks)
