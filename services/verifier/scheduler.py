"""The verifier's scheduler: which requests this replica serves, holds and queues, and what one step does. Plain
Python (no torch, bus or Redis): unit-tested on hand-built results (tests/services/verifier/test_scheduler.py).

Each step, in this order (`schedule`):
  1. cancels     a running request stops; a queued one is dropped; KV claimed or held for it is released, or, when
                 the Cancel names the client's tools (a client tool pause), kept / offloaded / dropped as the
                 retention policy says (client_retention.py)
  2. expiries    holds past their time are released; kept conversations whose recheck says so leave the device
  3. preemptions running requests the gateway pauses leave the batch, their KV kept or, as the retention policy
                 says, offloaded or dropped (preempted.py); those it lets go on come back first, while slots last
  4. Continues   of held requests (held.py): their KV is already here
  5. Generates   in arrival order, while batch slots and KV blocks last; kept conversations and paused requests'
                 KV are evicted to make room, as the retention policy orders
A step that prefills (3 after a release, 4, 5) does not decode; the next one does: a first token goes out as soon as
it exists. With chunked prefill, every step admits and decodes: the engine prefills a chunk beside the decode.

Block budget: a request needs its tokens and a draft tree's (`max_nodes + 1`) to start, and every running request
keeps two blocks of headroom to grow into. The plan counts the blocks its releases free and its admissions take.

Idempotent by request id: a second delivery of a request this replica is serving or queueing is not served twice
(the newer copy backs it, the older is acknowledged), nor is a Generate among the last `remember` finished.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from specrelay.services.toolcoord.retention import Retention
from specrelay.services.verifier.handoffs import (
    Admit,
    Reject,
    Release,
    Reply,
    RequestOutput,
    Resume,
    Serving,
    StepPlan,
    StepResult,
    Unpause,
)
from specrelay.services.verifier.held import HeldRequests
from specrelay.services.verifier.preempted import PausedRuns

if TYPE_CHECKING:
    from specrelay.services.verifier.client_retention import ClientRetention

log = logging.getLogger(__name__)

class BlockBudget(Protocol):
    """The KV cache as the scheduler sees it: counts only."""

    block_size: int
    num_blocks: int

    def num_free_blocks(self) -> int: ...

    def blocks_of(self, kv: Any) -> int: ...  # blocks a finished request's or a claimed table's KV holds


class CacheBudget:
    """A PagedKVCache as a BlockBudget."""

    def __init__(self, cache: Any):
        self.cache, self.block_size, self.num_blocks = cache, cache.block_size, cache.allocator.num_blocks

    def num_free_blocks(self) -> int:
        return self.cache.num_free_blocks

    def blocks_of(self, kv: Any) -> int:
        return len(getattr(kv, "table", kv).blocks)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 32
    max_nodes: int = 16  # a request needs room for a draft tree of this many nodes beyond its tokens
    max_model_len: int = 2048
    max_hold_s: float = 300.0  # the longest a finished request's KV is held for a Continue
    remember: int = 10_000  # finished Generate ids remembered, so a late second copy of one is not served again
    chunked_prefill: bool = False  # the engine prefills admissions a chunk per step: admit and decode every step


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, budget: BlockBudget, retention: ClientRetention | None = None,
                 new_ledger=lambda: None, held: HeldRequests | None = None, paused: PausedRuns | None = None):
        self.cfg, self.budget, self.retention, self.new_ledger = cfg, budget, retention, new_ledger
        self.held = held if held is not None else HeldRequests()
        self.paused = paused if paused is not None else PausedRuns()
        self.preempts: dict[str, bool] = {}  # request id -> resume (True) or pause (False): Preempt messages
        self.preempt_acks: list[Any] = []
        self.waiting: list[Any] = []  # Generate deliveries, in arrival order
        self.continues: list[Any] = []  # Continue deliveries, waiting for a batch slot and blocks
        self.running: dict[str, Serving] = {}
        self.claimed: dict[str, Any] = {}  # kept KV that a waiting Generate has claimed by prefix
        self.cancels: dict[str, tuple[str, ...]] = {}  # request id -> the client's tool names (Cancel.tool_names)
        self.cancel_acks: list[Any] = []
        self.finished: OrderedDict[str, None] = OrderedDict()
        self._prefilled = False  # the last step prefilled: this one decodes

    @property
    def busy(self) -> bool:
        """Requests running: the next step has work without a new message (what waits for blocks is looked at
        again when a message comes, or within the receive timeout)."""
        return bool(self.running)

    # -- receive -----------------------------------------------------------------------------------------------

    def add_cancel(self, delivery: Any) -> None:
        msg = delivery.msg
        self.cancels[msg.request_id] = tuple(msg.tool_names) or self.cancels.get(msg.request_id, ())
        self.cancel_acks.append(delivery)

    def add_preempt(self, delivery: Any) -> None:
        self.preempts[delivery.msg.request_id] = delivery.msg.resume  # the later of a pause and a resume wins
        self.preempt_acks.append(delivery)

    def add_request(self, delivery: Any, first_turn: bool) -> list[Any]:
        """Queue a Generate (`first_turn`) or a Continue; returns the deliveries to acknowledge now: a copy of a
        Generate already served, or the older copy of a request this replica has (the copy that came last backs
        the request: after a Redis restart only it exists; the same entry twice needs no second acknowledgement)."""
        rid = delivery.msg.request_id
        if first_turn and rid in self.finished:
            log.info("verifier: request %s again, already served; dropped", rid)
            return [delivery]
        serving = self.running.get(rid)
        if serving is not None and serving.first_turn == first_turn:
            old, serving.delivery = serving.delivery, delivery
        else:
            queue = self.waiting if first_turn else self.continues
            i = next((i for i, d in enumerate(queue) if d.msg.request_id == rid), None)
            if i is None:
                queue.append(delivery)
                return []
            old, queue[i] = queue[i], delivery
        log.info("verifier: request %s delivered again while it is here; served once", rid)
        return [old] if (old.stream, old.message_id) != (delivery.stream, delivery.message_id) else []

    # -- schedule ----------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._cancel(plan)
        self._expire(plan)
        self._preempt(plan)
        decodable = any(rid not in plan.cancelled for rid in self.running)
        mixed = self.cfg.chunked_prefill  # prefills go a chunk per step beside the decode (chunked_prefill.py)
        if mixed or not (self._prefilled and decodable):
            room = _Room(self, plan)
            self._unpause(plan, room)
            self._resume(plan, room)
            self._admit(plan, room)
        self._prefilled = bool(plan.resumes or plan.admits or any(u.reload for u in plan.unpaused))
        plan.decode = (decodable or bool(plan.unpaused)) and (mixed or not self._prefilled)
        return plan

    def _cancel(self, plan: StepPlan) -> None:
        for rid, tool_names in self.cancels.items():
            if (run := self.paused.take(rid)) is not None:  # the engine cancels it from its paused requests
                run.serving.num_blocks = run.num_blocks
                self.running[rid] = run.serving
            if rid in self.running:
                plan.cancelled.append(rid)
            plan.acks += [d for d in self.waiting if d.msg.request_id == rid]  # nobody else should start it
            self.waiting = [d for d in self.waiting if d.msg.request_id != rid]
            plan.acks += [d for d in self.continues if d.msg.request_id == rid]
            self.continues = [d for d in self.continues if d.msg.request_id != rid]
            if (table := self.claimed.pop(rid, None)) is not None:
                plan.releases.append(Release(table, publish=False))
            if (held := self.held.take(rid)) is not None:
                if not tool_names or self.retention is None:
                    plan.releases.append(Release(held.kv, publish=True))
                elif (action := self.retention.pause(rid, held.kv, tool_names)) is not Retention.KEEP:
                    plan.releases.append(Release(held.kv, publish=action is Retention.OFFLOAD))
        self.cancels.clear()
        plan.acks += self.cancel_acks
        self.cancel_acks = []

    def _expire(self, plan: StepPlan) -> None:
        plan.releases += [Release(held.kv, publish=True) for held in self.held.expired()]
        for kv, action in self.retention.due() if self.retention is not None else ():
            plan.releases.append(Release(kv, publish=action is Retention.OFFLOAD))

    def _preempt(self, plan: StepPlan) -> None:
        """Pauses and resumes from the gateway's SLO schedule; a request not running or paused here is not ours
        (or has finished): nothing to do. Newly paused requests' KV is kept, offloaded or dropped as the retention
        policy says."""
        for rid, resume in self.preempts.items():
            if resume and (run := self.paused.get(rid)) is not None:
                run.resume = True
            elif not resume and rid in self.running and rid not in plan.cancelled and self.running[rid].sent:
                plan.paused.append(rid)
                self.paused.pause(rid, self.running.pop(rid))
        self.preempts.clear()
        plan.acks += self.preempt_acks
        self.preempt_acks = []
        policy, used, _ = self._kv_policy()
        for kv, action in self.paused.decide(policy, used):
            plan.releases.append(Release(kv, publish=action is Retention.OFFLOAD))

    def _unpause(self, plan: StepPlan, room: _Room) -> None:
        """Paused requests the gateway let go on, longest paused first, while batch slots last and their blocks fit:
        their context if it left the device, plus two blocks to grow into as any running request keeps."""
        for rid, run in self.paused.ready():
            if not room.slots():
                return
            need = 2 if run.kept else self._blocks(run.num_tokens + self.cfg.max_nodes + 1)
            if need > room.headroom():
                return
            self.paused.take(rid)
            self.paused.resumed(self._kv_policy()[0], run)
            plan.unpaused.append(Unpause(rid, run.kv, reload=not run.kept))
            room.take(0 if run.kept else need - 2)
            run.serving.num_blocks = run.num_blocks
            self.running[rid] = run.serving

    def _resume(self, plan: StepPlan, room: _Room) -> None:
        """Continues in order while batch slots last; the first that waits for blocks stops the rest (the hold's
        clock keeps running). One that cannot go on is answered with an error, its held KV released."""
        while self.continues and room.slots():
            msg = self.continues[0].msg
            held = self.held.get(msg.request_id)
            error = (f"request {msg.request_id} is not held here (its hold expired or it was released)"
                     if held is None else self._check_continue(held.num_tokens, msg.token_ids))
            if error is None:
                total = held.num_tokens + len(msg.token_ids)
                if self._blocks(total + self.cfg.max_nodes + 1) - held.num_blocks > room.headroom():
                    return
            delivery = self.continues.pop(0)
            self.held.take(msg.request_id)
            if error is not None:
                if held is not None:
                    plan.releases.append(Release(held.kv, publish=True))
                plan.rejects.append(Reject(delivery, error))
                continue
            plan.resumes.append(Resume(msg.request_id, held.kv, list(msg.token_ids), msg.sampling))
            room.take(max(0, self._blocks(total) - held.num_blocks))
            self.running[msg.request_id] = Serving(delivery, False, held.ledger, num_blocks=held.num_blocks)

    def _admit(self, plan: StepPlan, room: _Room) -> None:
        """Generates in arrival order (no overtaking: a long prompt is never starved) while slots and blocks last."""
        while self.waiting and room.slots():
            msg = self.waiting[0].msg
            rid, prompt = msg.request_id, msg.prompt_token_ids
            if error := self._check_generate(prompt):
                plan.rejects.append(Reject(self.waiting.pop(0), error))
                self._remember(rid)
                continue
            if not self._make_room(plan, room, rid, prompt):
                return  # wait for running requests to free blocks
            table = self.claimed.pop(rid, None)
            claimed_blocks = self.budget.blocks_of(table) if table is not None else 0
            plan.admits.append(Admit(rid, list(prompt), msg.sampling, table))
            room.take(max(0, self._blocks(len(prompt)) - claimed_blocks))
            self.running[rid] = Serving(self.waiting.pop(0), True, self.new_ledger())

    def _make_room(self, plan: StepPlan, room: _Room, rid: str, prompt: list[int]) -> bool:
        """Whether a Generate's blocks, less those of KV kept for its conversation (claimed now), fit; kept
        conversations are evicted for it, as the retention policy orders."""
        if self.retention is not None and rid not in self.claimed:
            if (kept := self.retention.claim(prompt)) is not None:
                self.claimed[rid] = kept
        need = self._blocks(len(prompt) + self.cfg.max_nodes + 1)
        if rid in self.claimed:
            need -= self.budget.blocks_of(self.claimed[rid])
        short = need - room.headroom()
        if short > 0 and self.retention is not None:
            for kv, action in self.retention.evict(short):
                plan.releases.append(Release(kv, publish=action is Retention.OFFLOAD))
            short = need - room.headroom()
        if short > 0:
            policy, used, bytes_per_block = self._kv_policy()
            for kv, action in self.paused.evict(short, policy, used, bytes_per_block):
                plan.releases.append(Release(kv, publish=action is Retention.OFFLOAD))
            short = need - room.headroom()
        return short <= 0

    # -- update ------------------------------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Reply]:
        """Apply what the engine did; returns the chunks to send, in order. A finished turn is held for a Continue
        (it ended by its stop token and the sender asked) or its KV released."""
        for admit in plan.admits:
            if (serving := self.running.get(admit.request_id)) is not None:
                serving.cached_tokens, serving.relay = admit.cached_tokens, admit.relay
        for rid, paused in result.paused.items():
            self.paused.paused_by_engine(rid, paused.kv, paused.num_tokens, paused.num_blocks)
        replies = [self._apply(out) for out in result.outputs]
        reported = {out.request_id for out in result.outputs}
        due = {*plan.cancelled, *(r.request_id for r in plan.resumes), *(a.request_id for a in plan.admits)}
        for rid in [rid for rid in self.running if rid not in reported and (result.decoded or rid in due)]:
            serving = self.running.pop(rid)  # never expected: fail it rather than the replica
            self._remember(rid)
            replies.append(Reply(serving, [], serving.sent, "error", "the verifier lost this request"))
        return [r for r in replies if r is not None]

    def _apply(self, out: RequestOutput) -> Reply | None:
        serving = self.running.get(out.request_id)
        if serving is None:
            return None
        if out.cached_tokens is not None and not serving.first_turn:
            serving.carried = serving.cached_tokens = out.cached_tokens
        serving.num_blocks = out.num_blocks
        offset, serving.sent = serving.sent, serving.sent + len(out.new_tokens)
        if out.finish_reason is None:
            return Reply(serving, out.new_tokens, offset) if out.new_tokens else None
        del self.running[out.request_id]
        if serving.first_turn or out.finish_reason == "error":
            self._remember(out.request_id)
        if out.finish_reason == "error":
            return Reply(serving, [], offset, "error", out.error)
        reply = Reply(serving, out.new_tokens, offset, out.finish_reason, turn=out)
        hold_s = min(serving.msg.hold_s, self.cfg.max_hold_s) if out.finish_reason == "stop" else 0.0
        if hold_s > 0:
            self.held.hold(out.request_id, out.kv, serving.ledger, hold_s, out.num_prompt_tokens + len(out.output),
                           out.num_blocks)
            reply.held = True
        elif out.kv is not None:
            reply.release = Release(out.kv, publish=True)
        return reply

    # -- stop --------------------------------------------------------------------------------------------------

    def close(self) -> tuple[list[str], list[Any], list[Any]]:
        """The replica stops: (running requests to stop, queued Continues to answer with an error, KV to free
        unpublished: held, kept, claimed). Generates stay unacknowledged, for another replica to take over."""
        running, self.running = [*self.running, *(rid for rid, _ in self.paused.take_all())], {}
        continues, self.continues = self.continues, []
        free = [held.kv for held in self.held.take_all()]
        free += self.retention.let_go_all() if self.retention is not None else []
        free += list(self.claimed.values())
        self.claimed, self.waiting = {}, []
        return running, continues, free

    def num_kept_blocks(self) -> int:
        """Blocks held for Continues or kept across client tool pauses."""
        kept = self.held.num_blocks() + self.paused.num_blocks()
        return kept + (self.retention.num_blocks() if self.retention is not None else 0)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _kv_policy(self) -> tuple[Any, int, int]:
        """(the PTE retention policy or None, KV bytes in use, bytes per block) for paused requests' KV."""
        if self.retention is None:
            return None, 0, 0
        cache = self.retention.cache
        bytes_per_block = cache.bytes_per_block()
        used = (cache.allocator.num_blocks - cache.num_free_blocks) * bytes_per_block
        return self.retention.policy, used, bytes_per_block

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.budget.block_size)

    def _check_generate(self, prompt: list[int]) -> str | None:
        limit = self.cfg.max_model_len
        if not prompt:
            return "the prompt is empty"
        if len(prompt) >= limit:
            return f"the prompt has {len(prompt)} tokens; this model's context is {limit}"
        if self._blocks(len(prompt) + self.cfg.max_nodes + 1) > self.budget.num_blocks:
            return f"the prompt has {len(prompt)} tokens, more than this verifier's KV cache holds"
        return None

    def _check_continue(self, num_tokens: int, token_ids: list[int]) -> str | None:
        if not token_ids:
            return "a Continue needs tokens to append"
        if num_tokens + len(token_ids) >= self.cfg.max_model_len:
            return (f"the conversation would have {num_tokens + len(token_ids)} tokens; this model's context is "
                    f"{self.cfg.max_model_len}")
        return None

    def _remember(self, request_id: str) -> None:
        self.finished[request_id] = None
        while len(self.finished) > self.cfg.remember:
            self.finished.popitem(last=False)


class _Room:
    """Batch slots and blocks left in the step being planned: free blocks, plus those the plan's releases and
    cancels give back, less two per running request and what the plan's admissions take."""

    def __init__(self, scheduler: Scheduler, plan: StepPlan):
        self.s, self.plan, self.taken = scheduler, plan, 0

    def slots(self) -> bool:
        return len(self.s.running) - len(self.plan.cancelled) < self.s.cfg.max_batch

    def headroom(self) -> int:
        freed = sum(self.s.budget.blocks_of(r.kv) for r in self.plan.releases)
        freed += sum(self.s.running[rid].num_blocks for rid in self.plan.cancelled)
        running = len(self.s.running) - len(self.plan.cancelled)
        return self.s.budget.num_free_blocks() + freed - self.taken - 2 * running

    def take(self, num_blocks: int) -> None:
        self.taken += num_blocks
