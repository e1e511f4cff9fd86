"""Preemption in the verifier's scheduler, on hand-built results (no model): a paused request leaves the batch
with its KV kept, goes on without a prefill when resumed, and, when an admission needs its blocks, its KV is
released and recomputed on resume."""

from __future__ import annotations

from specrelay.services.verifier.handoffs import PausedOutput, Release, StepResult, Unpause
from specrelay.shared.messages import Cancel, Preempt

from .test_scheduler import KV, Delivery, gen, make, out


def preempt(rid: str, resume: bool = False) -> Delivery:
    return Delivery(Preempt(rid, resume), stream="verifier.cancel")


def start(s, *rids):
    """Admit `rids` and run their prefill step."""
    for rid in rids:
        s.add_request(gen(rid), first_turn=True)
    plan = s.schedule()
    s.update(plan, StepResult([out(rid, [10], started=True) for rid in rids]))


def test_a_paused_request_leaves_the_batch_keeps_its_kv_and_goes_on_without_a_prefill():
    s, budget, _ = make(max_batch=2)
    start(s, "a", "b")
    p = preempt("a")
    s.add_preempt(p)
    plan = s.schedule()
    assert plan.paused == ["a"] and plan.decode and p in plan.acks
    kv = KV(3)
    replies = s.update(plan, StepResult([out("b", [11])], paused={"a": PausedOutput(kv, 7, 3)}, decoded=True))
    assert [r.serving.msg.request_id for r in replies] == ["b"] and list(s.running) == ["b"]
    assert s.num_kept_blocks() == 3  # its blocks stay in use
    s.add_request(gen("c"), first_turn=True)  # the slot it left goes to a waiting request
    plan = s.schedule()
    assert [a.request_id for a in plan.admits] == ["c"] and not plan.releases
    s.update(plan, StepResult([out("c", [12], started=True)]))
    s.add_preempt(preempt("a", resume=True))
    plan = s.schedule()  # no slot yet: "b" and "c" run
    assert plan.unpaused == [] and plan.decode
    s.update(plan, StepResult([out("b", [13], reason="length"), out("c", [14])], decoded=True))
    plan = s.schedule()
    assert plan.unpaused == [Unpause("a", kv, reload=False)] and plan.decode  # kept KV: it decodes this step
    replies = s.update(plan, StepResult([out("a", [15]), out("c", [16])], decoded=True))
    assert [(r.serving.msg.request_id, r.token_ids, r.offset) for r in replies] == [("a", [15], 1), ("c", [16], 2)]
    assert s.num_kept_blocks() == 0


def test_an_admission_that_needs_the_blocks_evicts_a_paused_request_and_it_is_recomputed_on_resume():
    s, budget, _ = make(num_blocks=16, max_batch=2)
    start(s, "a")
    s.add_preempt(preempt("a"))
    plan = s.schedule()
    kv = KV(5)
    s.update(plan, StepResult(paused={"a": PausedOutput(kv, 18, 5)}))
    budget.free = 3  # "big" needs (20 + 3 + 1) / 4 = 6 blocks; "a"'s 5 are in use
    s.add_request(gen("big", n=20), first_turn=True)
    plan = s.schedule()
    assert plan.releases == [Release(kv, publish=True)]  # offloaded when a kvstore is on, else dropped
    assert [a.request_id for a in plan.admits] == ["big"] and s.num_kept_blocks() == 0
    s.update(plan, StepResult([out("big", [20], blocks=6, started=True)]))
    s.add_preempt(preempt("a", resume=True))
    plan = s.schedule()  # the step after a prefill decodes
    assert plan.decode and plan.unpaused == []
    s.update(plan, StepResult([out("big", [21], blocks=6)], decoded=True))
    budget.free = 7  # "a" needs (18 + 4) / 4 = 6 blocks for its context, "big" keeps 2 of headroom
    assert s.schedule().unpaused == []
    budget.free = 8
    plan = s.schedule()
    assert plan.unpaused == [Unpause("a", kv, reload=True)] and not plan.decode  # it is prefilled again first
    s.update(plan, StepResult())
    plan = s.schedule()
    assert plan.decode and sorted(s.running) == ["a", "big"]


def test_a_cancel_stops_a_paused_request_and_a_preempt_for_a_request_not_here_is_acknowledged_only():
    s, _, _ = make(max_batch=2)
    start(s, "a")
    s.add_preempt(preempt("a"))
    plan = s.schedule()
    s.update(plan, StepResult(paused={"a": PausedOutput(KV(2), 6, 2)}))
    other = preempt("elsewhere")
    s.add_preempt(other)
    plan = s.schedule()
    assert other in plan.acks and not plan.runs_engine
    s.add_cancel(Delivery(Cancel("a"), stream="verifier.cancel"))
    plan = s.schedule()
    assert plan.cancelled == ["a"] and len(s.paused) == 0
    [reply] = s.update(plan, StepResult([out("a", reason="cancelled")]))
    assert reply.finish_reason == "cancelled" and reply.offset == 1


async def test_the_verifier_reads_preempts_from_the_cancel_stream_beside_cancels():
    from specrelay.services.verifier.inbox import Inbox
    from specrelay.shared.bus import make_bus
    from specrelay.shared.messages import CANCEL_STREAM

    async with make_bus(None) as bus:
        inbox = Inbox(bus, "v-preempt")  # replays what came just before it started
        inbox.start()
        await bus.publish(CANCEL_STREAM, Preempt("a"))
        await bus.publish(CANCEL_STREAM, Cancel("b"))
        await bus.publish(CANCEL_STREAM, Preempt("a", resume=True))
        got = []
        while len(got) < 3:
            got += [d.msg for d in await inbox.receive(block=True)]  # noqa: ASYNC110 - the bus wakes it
        await inbox.stop()
    assert got == [Preempt("a"), Cancel("b"), Preempt("a", resume=True)]
