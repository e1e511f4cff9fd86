"""Every metric from hand-built records whose answers are worked out by hand in the comments."""

import math

import numpy as np
import pytest

from specrelay.loadgen.metrics import percentile, request_meets_slo, run_duration_s, summarize
from specrelay.loadgen.records import RequestRecord, RunData, RunRecord, TrajectoryRecord

INTERACTIVE = {"slo_ttft_ms": 100.0, "slo_tpot_ms": 10.0}


def req(rid, traj, cls, *, ok=True, ttft=None, e2e=None, tokens=0, error=None, start=0.0, **slo):
    tpot = (e2e - ttft) / (tokens - 1) if ok and tokens > 1 else None
    return RequestRecord(request_id=rid, trajectory_id=traj, turn=0, agent="a", workload="w", slo_class=cls,
                         start_s=start, ok=ok, error=error, ttft_ms=ttft, e2e_ms=e2e, tpot_ms=tpot,
                         itl_ms=[tpot] * (tokens - 1) if tpot else [], completion_tokens=tokens, **slo)


def traj(tid, cls, e2e, tokens, *, n=1, failed=0, deadline=None, pte=None):
    return TrajectoryRecord(trajectory_id=tid, workload="w", slo_class=cls, start_s=0.0, e2e_ms=e2e, num_requests=n,
                            num_failed=failed, completion_tokens=tokens, deadline_ms=deadline, pte=pte)


def run_data():
    requests = [
        req("r1", "t1", "interactive", ttft=50, e2e=140, tokens=10, **INTERACTIVE),   # tpot 10: meets
        req("r2", "t2", "interactive", ttft=150, e2e=250, tokens=11, **INTERACTIVE),  # ttft 150 > 100: misses
        req("r3", "t3", "interactive", ttft=80, e2e=280, tokens=11, **INTERACTIVE),   # tpot 20 > 10: misses
        req("r4", "t4", "interactive", ok=False, error="HTTP 500: boom", e2e=5, **INTERACTIVE),
        req("r5", "t5", "deadline", ttft=20, e2e=900, tokens=100, slo_e2e_ms=1000.0),   # meets
        req("r6", "t6", "deadline", ttft=30, e2e=1200, tokens=50, slo_e2e_ms=1000.0),   # misses
        req("r7", "t7", "deadline", ttft=100, e2e=500, tokens=20, slo_e2e_ms=2000.0),   # relay stage 1: meets
        req("r8", "t7", "deadline", ttft=60, e2e=400, tokens=30, slo_e2e_ms=1500.0),    # relay stage 2: meets
        req("r9", "t8", "interactive", ttft=50, e2e=50, tokens=1, **INTERACTIVE),      # one token, no TPOT: meets
    ]
    trajectories = [
        traj("t1", "interactive", 140, 10),
        traj("t2", "interactive", 250, 11),
        traj("t3", "interactive", 280, 11),
        traj("t4", "interactive", 5, 0, failed=1),
        traj("t5", "deadline", 900, 100, deadline=1000.0, pte=200.0),
        traj("t6", "deadline", 1200, 50, deadline=1000.0),
        traj("t7", "deadline", 950, 50, n=2, deadline=2000.0, pte=400.0),
        traj("t8", "interactive", 300, 1, deadline=100.0),  # its request met, the trajectory's deadline did not
    ]
    run = RunRecord(label="x", endpoint="e", model="m", workload="mixed", arrival="poisson", rate=1.0,
                    burstiness=1.0, concurrency=None, seed=0, slos={}, started_at=0.0, duration_s=10.0)
    return RunData(run, requests, trajectories)


def test_counts_throughput_and_goodput():
    s = summarize(run_data())
    assert (s.num_requests, s.num_failed, s.num_trajectories) == (9, 1, 8)
    assert s.errors == {"HTTP 500": 1}
    assert s.request_throughput == pytest.approx(0.8)  # 8 successful requests / 10 s
    assert s.output_throughput == pytest.approx(23.3)  # 10+11+11+100+50+20+30+1 tokens / 10 s
    assert s.request_goodput == pytest.approx(0.5)  # r1 r5 r7 r8 r9 met all their SLOs (vLLM --goodput)
    assert s.token_goodput == pytest.approx(16.0)  # trajectories t1 (10) t5 (100) t7 (50) met: 160 tokens / 10 s
    assert s.attainment == pytest.approx(5 / 9)
    assert s.trajectory_attainment == pytest.approx(3 / 8)


def test_latency_percentiles_are_over_successful_requests():
    s = summarize(run_data())
    # TTFT of the 8 successful requests sorted: 20 30 50 50 60 80 100 150
    assert s.ttft.count == 8
    assert s.ttft.p50 == pytest.approx(55.0)  # rank 3.5
    assert s.ttft.p90 == pytest.approx(115.0)  # rank 6.3: 100 + 0.3 * 50
    assert s.ttft.mean == pytest.approx(67.5)
    # TPOT: r1 10, r2 10, r3 20, r5 880/99, r6 1170/49, r7 400/19, r8 340/29 (r9 has none)
    assert s.tpot.count == 7
    assert s.tpot.p50 == pytest.approx(340 / 29)
    assert s.e2e.p99 == pytest.approx(np.percentile([140, 250, 280, 900, 1200, 500, 400, 50], 99))
    assert s.itl.count == 9 + 10 + 10 + 99 + 49 + 19 + 29
    assert s.trajectory_e2e.count == 8


def test_per_class_attainment_and_token_goodput():
    s = summarize(run_data())
    assert list(s.per_class) == ["interactive", "deadline"]
    inter, dead = s.per_class["interactive"], s.per_class["deadline"]
    assert (inter.num_requests, inter.requests_met, inter.num_trajectories, inter.trajectories_met) == (5, 2, 5, 1)
    assert inter.token_goodput == pytest.approx(1.0)
    assert (dead.num_requests, dead.requests_met, dead.num_trajectories, dead.trajectories_met) == (4, 3, 3, 2)
    assert dead.token_goodput == pytest.approx(15.0)
    assert dead.attainment == pytest.approx(0.75)
    assert s.starved_classes() == []


def test_pte_is_summarised_over_trajectories_that_report_it():
    s = summarize(run_data())
    assert s.pte.count == 2 and s.pte.mean == pytest.approx(300.0)
    data = run_data()
    for t in data.trajectories:
        t.pte = None
    assert summarize(data).pte is None


def test_a_class_with_traffic_and_nothing_met_is_starved():
    data = run_data()
    data.requests = [r for r in data.requests if r.trajectory_id in ("t2", "t5")]
    data.trajectories = [t for t in data.trajectories if t.trajectory_id in ("t2", "t5")]
    assert summarize(data).starved_classes() == ["interactive"]


def test_slo_edge_cases():
    base = dict(request_id="r", trajectory_id="t", turn=0, agent="a", workload="w", slo_class="interactive",
                start_s=0.0)
    # No token at all: TTFT is the whole response time.
    assert not request_meets_slo(RequestRecord(ok=True, e2e_ms=150.0, slo_ttft_ms=100.0, **base))
    assert request_meets_slo(RequestRecord(ok=True, e2e_ms=90.0, slo_ttft_ms=100.0, **base))
    # A failed request never meets, whatever its times.
    assert not request_meets_slo(RequestRecord(ok=False, ttft_ms=1.0, e2e_ms=2.0, **base))
    # No targets: any success meets.
    assert request_meets_slo(RequestRecord(ok=True, ttft_ms=1e6, e2e_ms=2e6, **base))


def test_duration_falls_back_to_the_span_of_the_requests():
    data = run_data()
    data.run = None
    for i, r in enumerate(data.requests):
        r.start_s = float(i)  # r9 starts at 8 s and takes 50 ms; nothing ends later
    assert run_duration_s(data) == pytest.approx(8.05)
    assert math.isnan(summarize(RunData(None, [], [])).request_goodput)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = list(rng.exponential(size=n))
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert math.isnan(percentile([], 50))
