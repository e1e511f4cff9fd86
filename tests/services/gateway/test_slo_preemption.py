"""Preemption under `--schedule slo`, with hand-built tickets and a hand-driven clock: which running request is
paused for which waiting one, and how admission pauses it, hands its slot over and lets it go on."""

from __future__ import annotations

import asyncio

from specrelay.services.gateway.admission import Admission, FcfsPolicy

from .test_admission_slo import Clock, policy, ticket


def test_a_waiting_request_that_cannot_wait_pauses_the_running_one_with_the_most_slack():
    clock = Clock(100.0)
    p = policy(clock)
    running = [ticket("loose", deadline_s=160.0, max_tokens=1000),  # 10 s of work, 60 s away
               ticket("looser", slo="batch", max_tokens=1000),  # no target: yields first
               ticket("tight-ish", deadline_s=112.0, max_tokens=1000)]
    for t in running:
        p.admitted(t)
    urgent = ticket("urgent", deadline_s=103.0)  # 1.1 s of work, 3 s away; the next slot frees in ~10 s
    assert 0 <= p.slack_s(urgent, clock()) < p.next_free_s(clock())
    assert p.preempt([urgent], running) == "looser"
    p.paused(running[1])
    assert p.preempt([urgent], [running[0], running[2]]) == "loose"  # then the deadline one with most slack
    # "tight-ish" would miss its own deadline if paused until a slot frees: never chosen
    p.paused(running[0])
    assert p.preempt([urgent], [running[2]]) is None


def test_no_preemption_for_a_request_that_can_wait_or_cannot_make_it_anyway():
    clock = Clock(100.0)
    p = policy(clock)
    running = [ticket("short", deadline_s=200.0, max_tokens=10), ticket("batch", slo="batch", max_tokens=1000)]
    for t in running:
        p.admitted(t)
    # the next slot frees in 0.2 s ("short"): a request with 1.9 s of slack waits for it
    assert p.preempt([ticket("patient", deadline_s=103.0)], running) is None
    p.released(running[0])
    hopeless = ticket("hopeless", arrival_s=90.0, deadline_s=100.5)  # misses whatever happens: pauses nobody
    assert p.slack_s(hopeless, clock()) < 0
    assert p.preempt([hopeless], running[1:]) is None
    assert p.preempt([ticket("urgent", deadline_s=103.0)], running[1:]) == "batch"


def test_a_request_is_paused_at_most_max_preemptions_times_and_never_once_aged():
    clock = Clock(100.0)
    p = policy(clock, max_preemptions=1, aging_s=5.0)
    victim, other = (ticket("victim", slo="batch", max_tokens=1000),
                     ticket("old", slo="batch", arrival_s=90.0, max_tokens=1000))
    p.admitted(victim)
    p.admitted(other)
    urgent = ticket("urgent", deadline_s=103.0)
    assert p.preempt([urgent], [victim, other]) == "victim"  # "old" has waited past aging_s: it is not paused
    p.paused(victim)
    p.unpaused(victim)
    assert p.preempt([urgent], [victim, other]) is None


def test_a_paused_request_waiting_again_never_preempts_and_its_slack_counts_what_it_produced():
    clock = Clock(100.0)
    p = policy(clock)
    victim = ticket("victim", deadline_s=130.0, max_tokens=1000)
    p.admitted(victim)
    before = p.slack_s(victim, clock())
    p.progress(victim, 1)
    p.progress(victim, 901)
    assert p.slack_s(victim, clock()) > before  # 99 tokens left, not 1000
    blocker = ticket("blocker", slo="batch", arrival_s=100.0, max_tokens=10_000)
    p.admitted(blocker)
    p.paused(victim)
    clock.now_s = 128.0  # its slack (about 1.1 s) is now below the wait for a slot, but it is paused, not new
    assert 0 <= p.slack_s(victim, clock()) < p.next_free_s(clock())
    assert p.preempt([victim], [blocker]) is None
    fresh = ticket("fresh", arrival_s=128.0, deadline_s=130.5)  # a new request in the same spot would preempt, but
    assert p.preempt([victim, fresh], [blocker]) is None  # the blocker has run past aging_s: it is not paused
    young = ticket("young", slo="batch", arrival_s=127.0, max_tokens=10_000)
    p.admitted(young)
    assert p.preempt([victim, fresh], [blocker, young]) == "young"


def test_admission_pauses_the_victim_gives_the_slot_away_and_lets_it_go_on_when_picked():
    async def main():
        clock = Clock(100.0)
        adm = Admission(policy(clock), max_running=1, max_queued=4)
        told: list[tuple[str, bool]] = []
        adm.on_preempt = lambda rid, resume: told.append((rid, resume))
        victim = ticket("victim", slo="batch", max_tokens=1000)
        await adm.admit(victim)
        urgent = ticket("urgent", deadline_s=103.0)
        await asyncio.wait_for(adm.admit(urgent), 1.0)  # granted at once: the batch request's slot
        assert told == [("victim", False)] and adm.num_running == 1 and adm.num_waiting == 1
        adm.progress("victim", 5)  # tokens in flight when it was paused still teach the estimator
        assert adm.policy.estimator.generated("victim") == 5
        adm.release(urgent)
        assert told == [("victim", False), ("victim", True)] and adm.num_running == 1 and adm.num_waiting == 0
        adm.release(victim)
        assert adm.num_running == 0

    asyncio.run(main())


def test_a_paused_request_that_ends_meanwhile_leaves_the_queue_and_fcfs_never_preempts():
    async def main():
        clock = Clock(100.0)
        adm = Admission(policy(clock), max_running=1, max_queued=4)
        told: list[tuple[str, bool]] = []
        adm.on_preempt = lambda rid, resume: told.append((rid, resume))
        victim = ticket("victim", slo="batch", max_tokens=1000)
        await adm.admit(victim)
        await adm.admit(ticket("urgent", deadline_s=103.0))
        adm.release(victim)  # it finished before the verifier paused it: nothing waits for it any more
        assert adm.num_waiting == 0 and adm.num_running == 1

        fcfs = Admission(FcfsPolicy(), max_running=1, max_queued=4)
        fcfs.on_preempt = lambda rid, resume: told.append((rid, resume))
        await fcfs.admit(ticket("first", slo="batch"))
        waiter = asyncio.ensure_future(fcfs.admit(ticket("second", deadline_s=100.5)))
        await asyncio.sleep(0)
        assert not waiter.done() and told == [("victim", False)]
        waiter.cancel()

    asyncio.run(main())
