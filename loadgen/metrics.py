"""Metrics of a run, from its records alone (plain Python; no I/O).

Definitions (times in ms, rates per second of the run's duration: first request sent -> last response done):
- TTFT: request sent -> first chunk that carries a token (content, reasoning or a tool-call fragment).
- TPOT: (E2E - TTFT) / (output tokens - 1), per request, as vLLM's benchmark_serving defines it.
- ITL: the gap between consecutive token-carrying chunks (a chunk may carry several tokens under speculative
  decoding, so ITL is per chunk, TPOT per token).
- E2E: request sent -> stream finished.
- Latency percentiles (p50/p90/p99) are over successful requests, linearly interpolated as numpy.percentile.
- SLO attainment: the fraction of requests (or trajectories) that met every target they carry; a failed request
  never meets. A request with no token has TTFT = E2E; one with a single token has no TPOT, which meets.
- Request goodput: requests that met all their SLOs, per second (vLLM `benchmark_serving --goodput`).
- Token goodput: output tokens of the trajectories that met their SLO, per second (JITServe's service goodput:
  only the tokens of requests that meet their SLO are useful work; a compound request, here a trajectory, counts
  only when all of it did, including its end-to-end deadline).
- Throughput: output tokens of successful requests per second; request throughput likewise.
- PTE per trajectory: the sum of `usage.pte` over its requests, where the server reported it for all of them.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from specrelay.loadgen.records import RequestRecord, RunData, TrajectoryRecord
from specrelay.shared.slo import SLO_CLASSES


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class LatencyStats:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> "LatencyStats":
        mean = sum(values) / len(values) if values else math.nan
        return cls(len(values), mean, percentile(values, 50), percentile(values, 90), percentile(values, 99))


@dataclass
class ClassStats:
    num_requests: int = 0
    requests_met: int = 0
    num_trajectories: int = 0
    trajectories_met: int = 0
    output_tokens_met: int = 0  # output tokens of the trajectories that met their SLO
    token_goodput: float = 0.0

    @property
    def attainment(self) -> float:
        return self.requests_met / self.num_requests if self.num_requests else math.nan

    @property
    def trajectory_attainment(self) -> float:
        return self.trajectories_met / self.num_trajectories if self.num_trajectories else math.nan


@dataclass
class RunSummary:
    duration_s: float
    num_requests: int
    num_failed: int
    num_trajectories: int
    errors: dict[str, int]
    request_throughput: float
    output_throughput: float
    request_goodput: float
    token_goodput: float
    attainment: float
    trajectory_attainment: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    trajectory_e2e: LatencyStats
    per_class: dict[str, ClassStats] = field(default_factory=dict)
    pte: LatencyStats | None = None  # per trajectory, over those with a reported PTE
    pte_detail_mean: dict[str, float] = field(default_factory=dict)  # per usage.pte field, mean per trajectory

    def starved_classes(self) -> list[str]:
        """Classes that had traffic but no trajectory met its SLO."""
        return [c for c, s in self.per_class.items() if s.num_trajectories and s.trajectories_met == 0]


def request_meets_slo(r: RequestRecord) -> bool:
    if not r.ok:
        return False
    e2e = r.e2e_ms if r.e2e_ms is not None else math.inf
    ttft = r.ttft_ms if r.ttft_ms is not None else e2e
    return ((r.slo_ttft_ms is None or ttft <= r.slo_ttft_ms)
            and (r.slo_tpot_ms is None or r.tpot_ms is None or r.tpot_ms <= r.slo_tpot_ms)
            and (r.slo_e2e_ms is None or e2e <= r.slo_e2e_ms))


def trajectory_meets_slo(t: TrajectoryRecord, requests: list[RequestRecord]) -> bool:
    if t.num_requests == 0 or t.num_failed or len(requests) != t.num_requests:
        return False
    return all(request_meets_slo(r) for r in requests) and (t.deadline_ms is None or t.e2e_ms <= t.deadline_ms)


def run_duration_s(data: RunData) -> float:
    if data.run is not None and data.run.duration_s > 0:
        return data.run.duration_s
    spans = [(r.start_s, r.start_s + (r.e2e_ms or 0.0) / 1000.0) for r in data.requests]
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def error_kind(error: str | None) -> str:
    """`HTTP 503: overloaded` -> `HTTP 503`; `stream broken: ...` -> `stream broken`."""
    return (error or "unknown").split(":", 1)[0]


def summarize(data: RunData) -> RunSummary:
    duration = run_duration_s(data)
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    reqs, trajs = data.requests, data.trajectories
    ok = [r for r in reqs if r.ok]
    met = [r for r in reqs if request_meets_slo(r)]
    by_traj: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in reqs:
        by_traj[r.trajectory_id].append(r)
    traj_met = {t.trajectory_id for t in trajs if trajectory_meets_slo(t, by_traj[t.trajectory_id])}

    per_class: dict[str, ClassStats] = {}
    for cls in sorted({r.slo_class for r in reqs} | {t.slo_class for t in trajs}, key=_class_order):
        s = ClassStats()
        s.num_requests = sum(r.slo_class == cls for r in reqs)
        s.requests_met = sum(r.slo_class == cls for r in met)
        cls_trajs = [t for t in trajs if t.slo_class == cls]
        s.num_trajectories = len(cls_trajs)
        s.trajectories_met = sum(t.trajectory_id in traj_met for t in cls_trajs)
        s.output_tokens_met = sum(t.completion_tokens for t in cls_trajs if t.trajectory_id in traj_met)
        s.token_goodput = per_second(s.output_tokens_met)
        per_class[cls] = s

    ptes = [t.pte for t in trajs if t.pte is not None]
    return RunSummary(
        duration_s=duration,
        num_requests=len(reqs),
        num_failed=len(reqs) - len(ok),
        num_trajectories=len(trajs),
        errors=dict(Counter(error_kind(r.error) for r in reqs if not r.ok).most_common()),
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(sum(r.completion_tokens for r in ok)),
        request_goodput=per_second(len(met)),
        token_goodput=per_second(sum(t.completion_tokens for t in trajs if t.trajectory_id in traj_met)),
        attainment=len(met) / len(reqs) if reqs else math.nan,
        trajectory_attainment=len(traj_met) / len(trajs) if trajs else math.nan,
        ttft=LatencyStats.of([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        tpot=LatencyStats.of([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        itl=LatencyStats.of([x for r in ok for x in r.itl_ms]),
        e2e=LatencyStats.of([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        trajectory_e2e=LatencyStats.of([t.e2e_ms for t in trajs]),
        per_class=per_class,
        pte=LatencyStats.of(ptes) if ptes else None,  # type: ignore[arg-type]
        pte_detail_mean=_mean_fields([t.pte_detail for t in trajs if t.pte_detail]),
    )


def _mean_fields(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each field over the dicts that have it."""
    values: dict[str, list[float]] = defaultdict(list)
    for d in dicts:
        for k, v in d.items():
            values[k].append(v)
    return {k: sum(v) / len(v) for k, v in sorted(values.items())}


def _class_order(cls: str) -> tuple[int, str]:
    return (SLO_CLASSES.index(cls) if cls in SLO_CLASSES else len(SLO_CLASSES), cls)
