"""End-to-end runs of the runner against the in-process fake server (loopback only)."""

import numpy as np
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import TypeAdapter

from specrelay.loadgen.arrivals import ArrivalProcess
from specrelay.loadgen.client import EndpointError
from specrelay.loadgen.records import read_records
from specrelay.loadgen.runner import RunConfig, run_load
from specrelay.loadgen.workloads import make_task
from specrelay.shared.errors import ConfigError
from specrelay.shared.slo import DEFAULT_SLOS

OPENAI_MESSAGES = TypeAdapter(list[ChatCompletionMessageParam])


def cfg(url, workload="chat", **kw):
    kw.setdefault("num", 4)
    return RunConfig(endpoint=url, workload=workload, tool_pause_scale=0.001, progress=False, **kw)


async def test_a_closed_loop_chat_run_writes_every_record(serve_fake, tmp_path):
    url, state = await serve_fake()
    out = tmp_path / "run.jsonl"
    result = await run_load(cfg(url, num=6, concurrency=2, out=str(out), label="fcfs"))
    assert len(state.bodies) == 6
    data = read_records(out)
    assert data.run.label == "fcfs" and data.run.arrival == "closed" and data.run.model == "fake-model"
    assert data.run.duration_s > 0 and data.run.num_requests == 6
    assert sorted(t.trajectory_id for t in data.trajectories) == [f"chat-{i:06d}" for i in range(6)]
    assert all(r.ok and r.slo_class == "interactive" and r.completion_tokens == 8 for r in data.requests)
    assert all(r.slo_ttft_ms == DEFAULT_SLOS["interactive"].ttft_ms for r in data.requests)
    s = result.summary
    assert s.num_failed == 0 and s.attainment == 1.0 and s.output_throughput > 0
    assert s.token_goodput == pytest.approx(48 / data.run.duration_s)


async def test_agentic_loops_play_the_tools_in_openai_format(serve_fake, fake):
    # Four tool turns (the most a task plans), two parallel calls each, then a final answer.
    url, state = await serve_fake(fake.FakeBehaviour(tool_turns=4, parallel_tools=2, pte=5.0))
    result = await run_load(cfg(url, "agentic", num=3, concurrency=3))
    assert result.summary.num_requests == 15
    for t in result.data.trajectories:
        assert (t.num_requests, t.num_tool_pauses, t.num_failed) == (5, 4, 0)
        assert t.pte == pytest.approx(25.0)
    assert [r.finish_reason for r in result.data.requests].count("tool_calls") == 12
    last = [b for b in state.bodies if sum(m["role"] == "tool" for m in b["messages"]) == 8]
    assert len(last) == 3
    messages = last[0]["messages"]
    OPENAI_MESSAGES.validate_python(messages)
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "tool", "tool"] * 4
    call_ids = [c["id"] for c in messages[2]["tool_calls"]]
    assert [m["tool_call_id"] for m in messages[3:5]] == call_ids
    assert messages[2]["content"] is None
    assert messages[5]["tool_calls"][1]["function"]["arguments"] == '{"query": "step 2"}'
    assert all(b["tools"] and b["tool_choice"] == "auto" for b in state.bodies)


async def test_agentic_against_a_model_that_never_calls_tools_still_pauses(serve_fake):
    url, state = await serve_fake()
    result = await run_load(cfg(url, "agentic", num=2))
    for t in result.data.trajectories:
        planned = make_task("agentic", int(t.trajectory_id.split("-")[1]), 0, DEFAULT_SLOS).planned_steps
        assert t.num_requests == planned + 1 and t.num_tool_pauses == planned
    OPENAI_MESSAGES.validate_python(state.bodies[-1]["messages"])
    assert state.bodies[-1]["messages"][-1]["content"].startswith("Observation from ")


async def test_relay_prompts_quote_earlier_outputs_verbatim(serve_fake, fake):
    url, state = await serve_fake(fake.FakeBehaviour(tag_tokens=True, num_tokens=5))
    result = await run_load(cfg(url, "relay", num=1))
    (t,) = result.data.trajectories
    task = make_task("relay", 0, 0, DEFAULT_SLOS)
    assert t.num_requests == task.num_workers + 2 and t.slo_class == "deadline"
    plan = " r1.0 r1.1 r1.2 r1.3 r1.4"
    bodies = state.bodies
    for body in bodies[1:]:
        assert f"The plan:\n{plan}\n" in body["messages"][-1]["content"]
    review = bodies[-1]["messages"][-1]["content"]
    for n in range(2, 2 + task.num_workers):
        assert f" r{n}.0 r{n}.1 r{n}.2 r{n}.3 r{n}.4" in review
    # Each call is sent what is left of the pipeline's budget.
    budgets = [int(state.headers[i]["X-Deadline-Ms"]) for i in range(len(bodies))]
    assert budgets[0] <= DEFAULT_SLOS["deadline"].e2e_ms and budgets[-1] <= budgets[0]
    assert len({r.request_id for r in result.data.requests}) == t.num_requests
    assert {r.agent for r in result.data.requests} == {"planner", "reviewer"} | {
        f"worker-{i + 1}" for i in range(task.num_workers)}


async def test_pte_fields_are_summed_per_trajectory(serve_fake, fake):
    url, _ = await serve_fake(fake.FakeBehaviour(tool_turns=4, pte={"total": 5, "full_eviction": 12}))
    result = await run_load(cfg(url, "agentic", num=2))
    for t in result.data.trajectories:
        assert t.pte == 25.0 and t.pte_detail == {"full_eviction": 60.0, "total": 25.0}
    assert result.summary.pte_detail_mean == {"full_eviction": 60.0, "total": 25.0}


async def test_server_errors_are_counted_and_the_run_goes_on(serve_fake, fake, tmp_path):
    url, _ = await serve_fake(fake.FakeBehaviour(error_every=3, break_every=4))
    result = await run_load(cfg(url, num=12, concurrency=1, out=str(tmp_path / "r.jsonl")))
    s = result.summary
    # Requests 3, 6, 9, 12 answer HTTP 500; 4 and 8 are cut mid-stream (12 is already an HTTP error).
    assert s.num_requests == 12 and s.num_failed == 6
    assert s.errors == {"HTTP 500": 4, "stream closed before [DONE]": 2}
    assert sum(t.num_failed for t in result.data.trajectories) == 6
    assert s.attainment == pytest.approx(0.5)
    assert len(read_records(tmp_path / "r.jsonl").requests) == 12


async def test_open_loop_starts_trajectories_on_the_arrival_schedule(serve_fake):
    url, _ = await serve_fake()
    result = await run_load(cfg(url, num=15, rate=40.0, burstiness=0.5, seed=5))
    starts = sorted(t.start_s for t in result.data.trajectories)
    expected = ArrivalProcess(40.0, 0.5).schedule(15, seed=5)
    assert result.data.run.arrival == "gamma" and result.data.run.rate == 40.0
    # Never early; late only by event-loop scheduling (generous: the test machine is shared).
    assert np.all(starts >= expected - 0.002)
    assert np.median(starts - expected) < 0.05 and np.max(starts - expected) < 0.3


async def test_a_duration_bound_stops_starting_trajectories(serve_fake):
    url, _ = await serve_fake()
    result = await run_load(cfg(url, num=None, duration_s=0.4, rate=30.0, seed=2))
    assert result.summary.num_trajectories == len(ArrivalProcess(30.0).schedule_until(0.4, seed=2))
    closed = await run_load(cfg(url, num=None, duration_s=0.3, concurrency=2))
    assert closed.summary.num_trajectories >= 2
    assert max(t.start_s for t in closed.data.trajectories) < 0.3


async def test_a_mixed_run_has_every_class_and_workload(serve_fake, fake):
    url, _ = await serve_fake(fake.FakeBehaviour(tool_turns=1))
    result = await run_load(cfg(url, "mixed", num=24, concurrency=8))
    assert {t.workload for t in result.data.trajectories} == {"chat", "agentic", "relay", "research"}
    assert set(result.summary.per_class) == {"interactive", "deadline"}
    assert result.summary.num_failed == 0


async def test_a_bad_endpoint_fails_before_the_run():
    with pytest.raises(EndpointError, match="cannot reach"):
        await run_load(cfg("http://127.0.0.1:9"))


@pytest.mark.parametrize("kw, message", [
    (dict(rate=1.0, concurrency=2), "not both"),
    (dict(num=5, duration_s=3.0), "not both"),
    (dict(concurrency=0), "at least 1"),
    (dict(num=0), "at least 1"),
    (dict(rate=-1.0), "must be positive"),
    (dict(workload="poetry"), "unknown workload"),
])
def test_bad_run_settings_are_clear_errors(kw, message):
    kw = {"endpoint": "http://127.0.0.1:1", "workload": "chat", **kw}
    with pytest.raises(ConfigError, match=message):
        RunConfig(**kw)
