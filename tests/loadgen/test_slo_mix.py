"""`--workload slo-mix`: its shares, lengths and SLOs as stated in slo_mix.py, and what a server is sent."""

import math
import statistics
from collections import Counter

import pytest

from specrelay.loadgen.runner import RunConfig, run_load
from specrelay.loadgen.slo_mix import KINDS, PAUSE_BUDGET_MS, PROMPTS
from specrelay.loadgen.workloads import make_task
from specrelay.shared.slo import DEFAULT_SLOS, Slo, parse_slo_specs

TASKS = [make_task("slo-mix", i, 0, DEFAULT_SLOS) for i in range(4000)]


def test_the_kinds_follow_their_shares_and_are_seeded():
    counts = Counter(t.workload for t in TASKS)
    for name, kind in KINDS.items():
        assert counts[name] / len(TASKS) == pytest.approx(kind.share, abs=0.03)
    assert make_task("slo-mix", 7, 1, DEFAULT_SLOS) == make_task("slo-mix", 7, 1, DEFAULT_SLOS)
    assert make_task("slo-mix", 7, 1, DEFAULT_SLOS) != make_task("slo-mix", 7, 2, DEFAULT_SLOS)


@pytest.mark.parametrize("name", list(KINDS))
def test_lengths_are_lognormal_with_the_stated_median_and_clips(name):
    kind = KINDS[name]
    tasks = [t for t in TASKS if t.workload == name]
    outputs = [t.max_tokens for t in tasks]
    assert statistics.median(outputs) == pytest.approx(kind.max_tokens.median, rel=0.1)
    assert kind.max_tokens.lo <= min(outputs) and max(outputs) <= kind.max_tokens.hi
    instruction = len(PROMPTS[name].format("").split())
    prompt_words = [len(t.prompt.split()) - instruction for t in tasks]
    assert statistics.median(prompt_words) == pytest.approx(kind.prompt_words.median, rel=0.15)
    # a lognormal's lower quartile is median·e^(-0.674σ) (no clip reaches it)
    q1 = statistics.quantiles(outputs, n=4)[0]
    assert math.log(kind.max_tokens.median / q1) == pytest.approx(0.674 * kind.max_tokens.sigma, rel=0.2)


def test_each_kind_has_its_class_and_deadline_from_the_interactive_pace():
    slos = parse_slo_specs(["interactive:ttft=400ms,tpot=50ms", "batch:e2e=600s"])
    by_kind = {}
    for i in range(200):
        t = make_task("slo-mix", i, 3, slos)
        by_kind.setdefault(t.workload, t)
    chat, tool, agent, batch = (by_kind[k] for k in ("stream-chat", "tool-call", "agent-chain", "batch"))
    assert chat.slo_class == "interactive" and chat.request_slo == Slo(ttft_ms=400.0, tpot_ms=50.0)
    assert chat.deadline_ms is None
    assert tool.slo_class == "deadline" and tool.request_slo == Slo()
    assert tool.deadline_ms == pytest.approx(1.5 * (400 + 50 * tool.max_tokens))
    assert agent.slo_class == "deadline" and 2 <= agent.planned_steps <= 4
    calls = agent.planned_steps + 1
    assert agent.deadline_ms == pytest.approx(2.0 * calls * (400 + 50 * agent.max_tokens)
                                              + agent.planned_steps * PAUSE_BUDGET_MS)
    assert batch.slo_class == "batch" and batch.deadline_ms == 600_000.0


async def test_a_run_sends_each_kind_as_its_class(serve_fake, fake):
    url, state = await serve_fake(fake.FakeBehaviour(num_tokens=4))
    result = await run_load(RunConfig(endpoint=url, workload="slo-mix", num=24, concurrency=8, progress=False,
                                      tool_pause_scale=0.001))
    data = result.data
    assert result.summary.num_failed == 0 and len(data.trajectories) == 24
    tasks = {t.trajectory_id: make_task("slo-mix", int(t.trajectory_id.rsplit("-", 1)[1]), 0, DEFAULT_SLOS)
             for t in data.trajectories}
    assert {t.workload for t in tasks.values()} == set(KINDS)  # 24 tasks hold every kind with this seed
    for traj in data.trajectories:
        task = tasks[traj.trajectory_id]
        assert traj.workload == task.workload and traj.slo_class == task.slo_class
        assert traj.deadline_ms == task.deadline_ms
        # the fake calls no tools: an agent chain is one call per planned step, then the answer
        assert traj.num_requests == (task.planned_steps + 1 if task.workload == "agent-chain" else 1)
    for body, headers in zip(state.bodies, state.headers):
        cls = headers["X-SLO-Class"]
        assert ("X-Deadline-Ms" in headers) == (cls == "deadline")
        if body["messages"][0]["role"] == "system" and "function-calling" in body["messages"][0]["content"]:
            assert cls == "deadline" and body["tools"]
