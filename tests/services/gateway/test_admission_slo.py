"""The SLO schedule (`--schedule slo`) with hand-built tickets and a hand-driven clock: least slack first, hopeless
requests set aside, aging bounds every wait, and length estimates that move as tokens arrive."""

from __future__ import annotations

import asyncio

import pytest

from specrelay.services.gateway.admission import Admission, Ticket
from specrelay.services.gateway.slo_estimator import Estimator, EstimatorConfig
from specrelay.services.gateway.slo_policy import SloPolicy, SloPolicyConfig
from specrelay.services.gateway.state import GATEWAY
from specrelay.shared.slo import Slo

TARGETS = {"interactive": Slo(ttft_ms=1000.0, tpot_ms=100.0), "deadline": Slo(e2e_ms=30_000.0), "batch": Slo()}
# Priors a test can reason with: 0.1 s to the first token, 0.01 s per token.
EST = EstimatorConfig(prior_first_token_s=0.1, prior_tpot_s=0.01, min_samples=4)


class Clock:
    def __init__(self, now_s: float = 100.0):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def policy(clock: Clock, **cfg) -> SloPolicy:
    return SloPolicy(SloPolicyConfig(targets=TARGETS, estimator=EST, **cfg), clock=clock)


def ticket(rid: str, slo: str = "deadline", arrival_s: float = 100.0, deadline_s: float | None = None,
           max_tokens: int = 100) -> Ticket:
    return Ticket(rid, slo, arrival_s, deadline_s, num_prompt_tokens=20, max_tokens=max_tokens)


def test_least_slack_goes_first_whatever_the_arrival_order():
    clock = Clock(100.0)
    p = policy(clock)
    waiting = [ticket("loose", deadline_s=130.0),  # 30 s away, 1.1 s of work: slack 28.9 s
               ticket("tight", deadline_s=103.0),  # slack 1.9 s
               ticket("medium", deadline_s=110.0)]
    assert [round(p.slack_s(t, clock()), 3) for t in waiting] == [28.9, 1.9, 8.9]
    assert waiting[p.pick(waiting)].request_id == "tight"
    # an interactive request is due at its first token: 1 s after arrival, less the 0.1 s first-token delay
    chat = ticket("chat", slo="interactive", arrival_s=99.5, max_tokens=64)
    assert p.slack_s(chat, clock()) == pytest.approx(0.4)
    assert (waiting + [chat])[p.pick(waiting + [chat])].request_id == "chat"


def test_a_request_without_a_deadline_gets_its_class_one():
    clock = Clock(110.0)
    p = policy(clock)
    # deadline class, no X-Deadline-Ms: due 30 s after arrival
    assert p.slack_s(ticket("d", arrival_s=100.0), clock()) == pytest.approx(130.0 - 110.0 - 0.1 - 100 * 0.01)
    # batch has no target: infinite slack, so it goes after anything with a deadline
    waiting = [ticket("b", slo="batch"), ticket("d", arrival_s=100.0)]
    assert p.slack_s(waiting[0], clock()) == float("inf")
    assert p.pick(waiting) == 1


def test_hopeless_requests_wait_behind_those_that_can_still_make_it():
    clock = Clock(100.0)
    p = policy(clock)
    late = ticket("late", arrival_s=95.0, deadline_s=100.5)  # needs 1.1 s, has 0.5 s: misses whatever we do
    ok = ticket("ok", arrival_s=99.0, deadline_s=120.0)
    assert p.slack_s(late, clock()) < 0 < p.slack_s(ok, clock())
    assert [late, ok][p.pick([late, ok])].request_id == "ok"
    # with nobody left who can make it, the hopeless go oldest first rather than not at all
    older = ticket("older", arrival_s=90.0, deadline_s=99.0)
    assert [late, older][p.pick([late, older])].request_id == "older"


def test_aging_bounds_the_wait_of_a_hopeless_request_under_a_stream_of_feasible_ones():
    clock = Clock(100.0)
    p = policy(clock, aging_s=5.0, aged_every=3)
    p.admitted(ticket("long-runner", max_tokens=10_000))  # keeps the next free slot far away (100 s of work)
    hopeless = ticket("hopeless", arrival_s=100.0, deadline_s=100.5)
    picks = []
    for step in range(12):
        clock.now_s = 100.0 + step  # one pick a second, a fresh tight request each time
        waiting = [hopeless, ticket(f"f{step}", arrival_s=clock.now_s, deadline_s=clock.now_s + 2.0)]
        chosen = waiting[p.pick(waiting)].request_id
        picks.append(chosen)
        if chosen == "hopeless":
            break
    # not before it has waited aging_s (5 s), and then within aged_every picks
    assert "hopeless" not in picks[:5]
    assert picks[-1] == "hopeless" and len(picks) <= 5 + 3


def test_an_aged_request_takes_a_slot_the_feasible_ones_can_spare():
    clock = Clock(100.0)
    p = policy(clock, aging_s=5.0, aged_every=100)
    old_batch = ticket("batch", slo="batch", arrival_s=90.0)
    roomy = ticket("roomy", arrival_s=100.0, deadline_s=125.0)  # 24 s of slack
    p.admitted(ticket("short-runner", max_tokens=10))  # frees its slot within ~0.2 s
    assert p.next_free_s(clock()) < 1.0
    assert [old_batch, roomy][p.pick([old_batch, roomy])].request_id == "batch"
    # but not when the feasible one cannot wait for the next slot
    tight = ticket("tight", arrival_s=100.0, deadline_s=101.15)  # slack 0.05 s
    assert [old_batch, tight][p.pick([old_batch, tight])].request_id == "tight"


def test_length_estimates_are_learned_and_refined_as_tokens_arrive():
    est = Estimator(EstimatorConfig(quantile=0.9, min_samples=4, prior_tpot_s=0.05, ewma_alpha=0.5))
    assert est.output_tokens("deadline", 512) == 512  # nothing seen yet: the request's own bound
    for i, n in enumerate([40, 42, 45, 48, 50, 300, 310, 320, 330, 50]):
        est.admitted(f"old{i}", 0.0)
        est.finished(f"old{i}", "deadline", 512, n, completed=True)
    est.admitted("cut", 0.0)
    est.finished("cut", "deadline", 512, 7, completed=False)  # cancelled: teaches nothing
    assert est.output_tokens("deadline", 512) == 320  # the 0.9 quantile of the ten lengths
    # a running request refines it: past 60 tokens it is one of the long ones
    est.admitted("r", 10.0)
    est.progress("r", 1, 10.2)  # first token after 0.2 s
    assert est.output_tokens("deadline", 512, generated=1) == 320
    est.progress("r", 61, 11.2)  # 60 tokens in 1 s
    assert est.output_tokens("deadline", 512, generated=61) == 330
    assert est.tpot_s == pytest.approx(0.05 + 0.5 * (1 / 60 - 0.05))
    assert est.remaining_s("r", "deadline", 512, 11.2) == pytest.approx((330 - 61) * est.tpot_s)
    # beyond every length seen, it stays above what the request already has and within its max_tokens
    est.progress("r", 400, 12.0)
    assert est.output_tokens("deadline", 512, generated=400) == 512
    # another max_tokens in the same class borrows the class's lengths until it has its own
    assert est.output_tokens("deadline", 128, generated=0) == 128  # class quantile 320, clipped to 128


def test_learned_lengths_turn_a_request_feasible():
    clock = Clock(100.0)
    p = policy(clock)
    report = ticket("report", arrival_s=100.0, deadline_s=105.0, max_tokens=512)
    assert p.slack_s(report, clock()) < 0  # 512 tokens at 0.01 s do not fit in 5 s
    for i in range(8):
        done = ticket(f"done{i}", max_tokens=512)
        p.admitted(done)
        p.finished(done, 60, completed=True)
        p.released(done)
    assert p.slack_s(report, clock()) == pytest.approx(5.0 - 0.1 - 60 * 0.01)


async def test_admission_feeds_the_policy_and_admits_by_slack():
    clock = Clock(100.0)
    p = policy(clock)
    admission = Admission(p, max_running=1, max_queued=8)
    first = ticket("first", deadline_s=200.0)
    await admission.admit(first)
    order: list[str] = []

    async def wait(t: Ticket):
        await admission.admit(t)
        order.append(t.request_id)

    batch, urgent = ticket("batch", slo="batch"), ticket("urgent", deadline_s=104.0)
    tasks = [asyncio.create_task(wait(batch)), asyncio.create_task(wait(urgent))]
    for _ in range(5):
        await asyncio.sleep(0)
    clock.now_s = 100.5
    admission.progress("first", 1)
    clock.now_s = 101.0
    admission.progress("first", 11)
    assert p.estimator.tpot_s == pytest.approx(0.01 + 0.1 * (0.05 - 0.01))  # EWMA towards the 0.05 s measured
    admission.finished("first", 11, completed=True)
    admission.release(first)
    await asyncio.sleep(0)
    assert order == ["urgent"] and set(p.running) == {"urgent"}
    admission.release(urgent)
    await asyncio.gather(*tasks)
    assert order == ["urgent", "batch"]
    assert p.estimator.output_tokens("deadline", 100) == 100  # one sample is below min_samples: still the bound


@pytest.mark.parametrize("schedule,expected", [("fcfs", ["batch", "deadline"]), ("slo", ["deadline", "batch"])])
async def test_the_gateway_admits_in_the_order_its_schedule_says(make_gateway, schedule, expected):
    hello = [{"role": "user", "content": "Hello there"}]
    async with make_gateway(policy=schedule, max_running=1, delay_s=0.02) as h:

        async def post(max_tokens: int, headers: dict[str, str]):
            response = await h.client.post("/v1/chat/completions", headers=headers,
                                           json={"model": "tiny-chat", "messages": hello, "max_tokens": max_tokens})
            assert response.status == 200
            await response.read()

        holder = asyncio.create_task(post(30, {"X-SLO-Class": "interactive"}))
        while not h.fake.generates:
            await asyncio.sleep(0.005)
        batch = asyncio.create_task(post(5, {"X-SLO-Class": "batch"}))
        await asyncio.sleep(0.05)
        deadline = asyncio.create_task(post(5, {"X-SLO-Class": "deadline", "X-Deadline-Ms": "5000"}))
        await asyncio.gather(holder, batch, deadline)
        assert [g.slo_class for g in h.fake.generates[1:]] == expected
        if schedule == "slo":  # the policy measured the fake's pace instead of keeping its prior
            assert h.app[GATEWAY].admission.policy.estimator.tpot_s != EstimatorConfig().prior_tpot_s


def test_schedule_flags(tokenizer_dir, tmp_path):
    import argparse
    import shutil

    from specrelay.services.gateway import service
    from specrelay.services.gateway.admission import make_policy
    from specrelay.shared.errors import ConfigError

    model_dir = tmp_path / "m"
    shutil.copytree(tokenizer_dir, model_dir)
    parser = argparse.ArgumentParser()
    service.add_arguments(parser)
    config = service.build_config(parser.parse_args(
        ["--model", str(model_dir), "--schedule", "slo", "--class-slo", "interactive:ttft=2s", "--class-slo",
         "deadline:e2e=10s"])).gateway
    assert (config.policy, config.class_slos) == ("slo", ("interactive:ttft=2s", "deadline:e2e=10s"))
    targets = make_policy(config.policy, config.class_slos).config.targets
    assert targets["interactive"] == Slo(ttft_ms=2000.0, tpot_ms=100.0) and targets["deadline"] == Slo(e2e_ms=10_000.0)
    assert service.build_config(parser.parse_args(["--model", str(model_dir)])).gateway.policy == "fcfs"
    with pytest.raises(ConfigError, match="--class-slo.*'soon' is not a duration"):
        service.build_config(parser.parse_args(["--model", str(model_dir), "--schedule", "slo",
                                                "--class-slo", "ttft=soon"]))
