"""The verifier's scheduler on CPU with no model (as vLLM v1's scheduler tests): messages in, StepPlans out, and
hand-built StepResults standing for what the engine did."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from specrelay.services.verifier.handoffs import Release, RequestOutput, SpecStats, StepResult
from specrelay.services.verifier.held import HeldRequests
from specrelay.services.verifier.scheduler import Scheduler, SchedulerConfig
from specrelay.shared.messages import Cancel, Continue, Generate, SamplingSpec

BLOCK = 4


@dataclass
class Budget:
    """A KV cache of `num_blocks`, counted by hand: the test frees and takes blocks as the engine would."""

    num_blocks: int
    block_size: int = BLOCK
    free: int = -1

    def __post_init__(self):
        self.free = self.num_blocks if self.free < 0 else self.free

    def num_free_blocks(self) -> int:
        return self.free

    def blocks_of(self, kv) -> int:
        return kv.blocks


@dataclass
class KV:
    """What the engine hands back for a finished request: the scheduler only passes it on."""

    blocks: int


@dataclass
class Delivery:
    msg: object
    message_id: str = "1-0"
    stream: str = "verifier.generate"
    acks: list = field(default_factory=list)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def gen(rid: str, n: int = 5, hold_s: float = 0.0, message_id: str = "1-0") -> Delivery:
    return Delivery(Generate(rid, list(range(1, n + 1)), SamplingSpec(max_tokens=8), f"reply-{rid}", hold_s=hold_s),
                    message_id)


def cont(rid: str, tokens=(7, 8)) -> Delivery:
    return Delivery(Continue(rid, list(tokens), SamplingSpec(max_tokens=8), f"reply-{rid}"), stream="verifier.continue")


def make(num_blocks: int = 64, max_batch: int = 4, **cfg) -> tuple[Scheduler, Budget, Clock]:
    budget, clock = Budget(num_blocks), Clock()
    config = SchedulerConfig(max_batch=max_batch, max_nodes=3, max_model_len=64, **cfg)
    return Scheduler(config, budget, held=HeldRequests(clock)), budget, clock


def out(rid: str, tokens=(), blocks: int = 2, reason: str | None = None, started: bool = False, prompt: int = 5):
    o = RequestOutput(rid, list(tokens), blocks, reason, cached_tokens=0 if started else None)
    if reason is not None:
        o.kv = KV(blocks) if reason in ("stop", "length") else None
        o.num_prompt_tokens, o.output, o.stats = prompt, list(tokens), SpecStats()
    return o


def test_generates_start_in_arrival_order_while_batch_slots_last_and_a_prefill_step_is_followed_by_a_decode():
    s, _, _ = make(max_batch=2)
    for rid in ("a", "b", "c"):
        assert s.add_request(gen(rid), first_turn=True) == []
    plan = s.schedule()
    assert [a.request_id for a in plan.admits] == ["a", "b"] and not plan.decode
    replies = s.update(plan, StepResult([out("a", [11], started=True), out("b", [12], started=True)]))
    assert [(r.serving.msg.request_id, r.token_ids, r.offset) for r in replies] == [("a", [11], 0), ("b", [12], 0)]
    plan = s.schedule()  # "c" waits for a slot; the running ones decode
    assert plan.decode and not plan.admits and [d.msg.request_id for d in s.waiting] == ["c"]
    replies = s.update(plan, StepResult([out("a", [13, 14]), out("b", [15], reason="length")], decoded=True))
    assert [(r.token_ids, r.offset, r.finish_reason) for r in replies] == [([13, 14], 1, None), ([15], 1, "length")]
    assert replies[1].release == Release(replies[1].turn.kv, publish=True)  # not held: to the prefix cache, freed
    plan = s.schedule()
    assert [a.request_id for a in plan.admits] == ["c"]


def test_a_generate_that_does_not_fit_waits_and_nothing_overtakes_it():
    s, budget, _ = make(num_blocks=16)
    s.add_request(gen("big", n=30), first_turn=True)  # (30 + max_nodes + 1) / 4 = 9 blocks
    s.add_request(gen("small", n=2), first_turn=True)
    budget.free = 8
    plan = s.schedule()
    assert plan.admits == [] and not plan.decode
    budget.free = 9
    plan = s.schedule()
    assert [a.request_id for a in plan.admits] == ["big"]  # then "small" has 9 - 8 taken - 2 headroom < 2
    budget.free = 1
    s.update(plan, StepResult([out("big", [1], blocks=8, started=True)]))
    assert [d.msg.request_id for d in s.waiting] == ["small"]


def test_every_running_request_keeps_two_blocks_of_headroom():
    s, budget, _ = make(num_blocks=32)
    s.add_request(gen("a", n=4), first_turn=True)
    plan = s.schedule()
    s.update(plan, StepResult([out("a", [1], blocks=1, started=True)]))
    budget.free = 4  # "b" needs (4 + 4) / 4 = 2 blocks, "a" keeps 2
    s.add_request(gen("b", n=4), first_turn=True)
    s.schedule()  # a decode step comes first after a prefill
    assert [a.request_id for a in s.schedule().admits] == ["b"]
    budget.free = 3
    s.add_request(gen("c", n=4), first_turn=True)
    s.update(s.schedule(), StepResult([out("a", [2], blocks=1), out("b", [3], blocks=1)], decoded=True))
    assert s.schedule().admits == []  # 3 free - 2 x 2 kept < 2


def test_a_held_turn_goes_on_with_a_continue_and_one_not_held_gets_an_error():
    s, _, _ = make()
    s.add_request(gen("t", hold_s=10), first_turn=True)
    plan = s.schedule()
    [reply] = s.update(plan, StepResult([out("t", [5, 6], blocks=3, reason="stop", started=True)]))
    assert reply.held and reply.release is None and len(s.held) == 1 and s.num_kept_blocks() == 3
    s.add_request(cont("t"), first_turn=False)
    s.add_request(cont("nobody"), first_turn=False)
    plan = s.schedule()
    [resume] = plan.resumes
    assert (resume.request_id, resume.kv, resume.token_ids) == ("t", reply.turn.kv, [7, 8]) and len(s.held) == 0
    [reject] = plan.rejects
    assert reject.delivery.msg.request_id == "nobody" and "not held here" in reject.error
    [reply] = s.update(plan, StepResult([out("t", [9], blocks=4, started=True)]))
    assert (reply.token_ids, reply.offset, reply.serving.first_turn) == ([9], 0, False)


def test_a_hold_expires_on_its_clock_and_its_kv_goes_to_the_prefix_cache():
    s, _, clock = make(max_hold_s=5)
    s.add_request(gen("t", hold_s=60), first_turn=True)  # asks for more than the verifier holds
    plan = s.schedule()
    [reply] = s.update(plan, StepResult([out("t", [5], reason="stop", started=True)]))
    clock.now = 4.9
    assert s.schedule().releases == [] and len(s.held) == 1
    clock.now = 5.0
    assert s.schedule().releases == [Release(reply.turn.kv, publish=True)] and len(s.held) == 0


def test_cancels_stop_running_drop_queued_and_release_held_requests_and_are_acknowledged():
    s, _, _ = make(max_batch=1)
    s.add_request(gen("held", hold_s=10), first_turn=True)
    s.update(s.schedule(), StepResult([out("held", [5], blocks=3, reason="stop", started=True)]))
    s.add_request(gen("run"), first_turn=True)
    s.update(s.schedule(), StepResult([out("run", [1], started=True)]))
    queued = gen("queued")
    s.add_request(queued, first_turn=True)
    cancels = [Delivery(Cancel(rid), stream="verifier.cancel") for rid in ("run", "queued", "held", "unknown")]
    for c in cancels:
        s.add_cancel(c)
    plan = s.schedule()
    assert plan.cancelled == ["run"] and not plan.decode
    assert plan.acks == [queued, *cancels] and s.waiting == []
    assert [(r.kv.blocks, r.publish) for r in plan.releases] == [(3, True)] and len(s.held) == 0
    [reply] = s.update(plan, StepResult([out("run", [], reason="cancelled")]))
    assert reply.finish_reason == "cancelled" and reply.release is None and s.running == {}


def test_expiries_free_blocks_before_the_continues_and_generates_of_the_same_step():
    s, budget, clock = make(num_blocks=16)
    s.add_request(gen("t", hold_s=1), first_turn=True)
    s.update(s.schedule(), StepResult([out("t", [5], blocks=10, reason="stop", started=True)]))
    budget.free = 6
    s.add_request(gen("next", n=20), first_turn=True)  # (20 + 4) / 4 = 6 blocks: fits
    s.add_request(cont("t"), first_turn=False)
    clock.now = 2.0
    plan = s.schedule()
    assert [r.kv.blocks for r in plan.releases] == [10]  # expired first...
    assert "not held here" in plan.rejects[0].error  # ...so its Continue comes too late
    assert [a.request_id for a in plan.admits] == ["next"]


def test_continues_go_before_generates_that_came_first():
    s, _, _ = make(max_batch=2)
    s.add_request(gen("t", hold_s=10), first_turn=True)
    s.update(s.schedule(), StepResult([out("t", [5], reason="stop", started=True)]))
    s.add_request(gen("x"), first_turn=True)
    s.add_request(gen("y"), first_turn=True)
    s.add_request(cont("t"), first_turn=False)
    plan = s.schedule()
    assert [r.request_id for r in plan.resumes] == ["t"] and [a.request_id for a in plan.admits] == ["x"]


def test_a_request_delivered_twice_is_admitted_once_and_the_older_copy_acknowledged():
    s, _, _ = make()
    first, again, same = gen("r", message_id="1-0"), gen("r", message_id="2-0"), gen("r", message_id="2-0")
    assert s.add_request(first, first_turn=True) == []
    assert s.add_request(again, first_turn=True) == [first]  # a republished copy backs it from now on
    assert s.add_request(same, first_turn=True) == []  # the same entry handed back needs no second ack
    plan = s.schedule()
    assert [a.request_id for a in plan.admits] == ["r"] and len(s.waiting) == 0
    late = gen("r", message_id="3-0")
    assert s.add_request(late, first_turn=True) == [same]  # while it runs
    [reply] = s.update(plan, StepResult([out("r", [1], reason="length", started=True)]))
    assert reply.serving.delivery is late
    repeat = gen("r", message_id="4-0")
    assert s.add_request(repeat, first_turn=True) == [repeat]  # already served: dropped
    assert s.schedule().admits == []


def test_finished_ids_are_remembered_up_to_the_limit():
    assert SchedulerConfig().remember == 10_000
    s, _, _ = make(max_batch=8, remember=3)
    for rid in "abcd":
        s.add_request(gen(rid), first_turn=True)
    plan = s.schedule()
    s.update(plan, StepResult([out(rid, [1], reason="length", started=True) for rid in "abcd"]))
    assert list(s.finished) == ["b", "c", "d"]
    assert s.add_request(gen("a"), first_turn=True) == []  # forgotten: served again
    assert len(s.add_request(gen("d"), first_turn=True)) == 1


def test_bad_requests_are_rejected_and_failures_answered_without_stopping_the_others():
    s, _, _ = make(num_blocks=8)
    for d in (gen("empty", n=0), gen("long", n=64), gen("huge", n=40), gen("ok"), gen("poison")):
        s.add_request(d, first_turn=True)
    plan = s.schedule()
    assert [(r.delivery.msg.request_id, r.error.split(";")[0]) for r in plan.rejects] == [
        ("empty", "the prompt is empty"), ("long", "the prompt has 64 tokens"),
        ("huge", "the prompt has 40 tokens, more than this verifier's KV cache holds")]
    assert [a.request_id for a in plan.admits] == ["ok", "poison"]
    failed = RequestOutput("poison", finish_reason="error", error="could not start")
    replies = s.update(plan, StepResult([out("ok", [1], started=True), failed]))
    assert [(r.serving.msg.request_id, r.finish_reason, r.error) for r in replies] == [
        ("ok", None, None), ("poison", "error", "could not start")]
    assert list(s.running) == ["ok"] and "poison" in s.finished
    [lost] = s.update(s.schedule(), StepResult([], decoded=True))  # a decode step that did not report "ok"
    assert (lost.finish_reason, lost.error) == ("error", "the verifier lost this request")


def test_close_hands_back_running_queued_continues_and_held_kv():
    s, _, _ = make()
    s.add_request(gen("h", hold_s=10), first_turn=True)
    [reply] = s.update(s.schedule(), StepResult([out("h", [5], reason="stop", started=True)]))
    s.add_request(gen("r"), first_turn=True)
    s.update(s.schedule(), StepResult([out("r", [1], started=True)]))
    c = cont("x")
    s.add_request(c, first_turn=False)
    assert s.close() == (["r"], [c], [reply.turn.kv])
    assert not s.busy and len(s.held) == 0


def test_the_scheduler_imports_no_torch_bus_or_redis():
    code = ("import sys; import specrelay.services.verifier.scheduler; "
            "print(sorted(m for m in ('torch', 'aiohttp', 'redis', 'specrelay.shared.bus') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
