"""`specrelay loadgen capacity`: the search of capacity.py against a live endpoint, one open-loop run per rate.

Each rate is a `run` with Poisson arrivals for `duration_s` (the same seed, so the same tasks in the same order at
every rate); in-flight trajectories then get `drain_s` to finish and the rest are cancelled (they count as in
flight to the end). The curve goes to `capacity.json` (and one JSONL of records per rate) in the output folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from specrelay.loadgen.arrivals import ArrivalProcess
from specrelay.loadgen.capacity import CapacityResult, CapacitySearch, Trace, Verdict, judge, search_capacity
from specrelay.loadgen.runner import RunConfig, RunResult, run_load


def trace_of(rate: float, duration_s: float, result: RunResult) -> Trace:
    finishes = [(t.start_s + t.e2e_ms / 1000.0, t.num_requests > 0 and t.num_failed == 0)
                for t in result.data.trajectories]
    return Trace(rate=rate, duration_s=duration_s, arrivals_s=list(result.started_s), finishes=finishes)


def make_probe(base: RunConfig, search: CapacitySearch, endpoint: str,
               out_dir: str | None) -> Callable[[float], Awaitable[Verdict]]:
    async def probe(rate: float) -> Verdict:
        name = f"capacity-{rate:.4g}.jsonl"
        # The runner's drain starts at the last arrival; the window runs to the duration's end, so the drain is
        # stretched by the gap: nothing is cancelled inside the window.
        arrivals = ArrivalProcess(rate, base.burstiness).schedule_until(search.duration_s, base.seed)
        gap_s = search.duration_s - float(arrivals[-1]) if len(arrivals) else search.duration_s
        cfg = replace(base, endpoint=endpoint, rate=rate, concurrency=None, num=None, duration_s=search.duration_s,
                      drain_timeout_s=search.drain_s + gap_s, label=f"capacity {rate:.4g}/s",
                      out=str(Path(out_dir) / name) if out_dir else None)
        result = await run_load(cfg)
        verdict = judge(trace_of(rate, search.duration_s, result), search.criterion)
        s = result.summary
        verdict.ttft_p50_ms, verdict.ttft_p99_ms, verdict.num_failed_requests = s.ttft.p50, s.ttft.p99, s.num_failed
        verdict.records = name if out_dir else None  # a name inside the output folder: no machine path in results
        return verdict

    return probe


async def measure_capacity(base: RunConfig, search: CapacitySearch, endpoint: str, out_dir: str | None,
                           log: Callable[[str], None] = print) -> CapacityResult:
    return await search_capacity(search, make_probe(base, search, endpoint, out_dir), log)


def capacity_report(result: CapacityResult, base: RunConfig, search: CapacitySearch) -> dict[str, Any]:
    return json_clean({
        "capacity_trajectories_per_s": result.capacity, "first_failing_rate": result.first_failing,
        "bracketed": result.bracketed, "workload": base.workload, "seed": base.seed,
        "slos": {cls: slo.as_dict() for cls, slo in base.slos.items()},
        "search": {k: v for k, v in asdict(search).items() if k != "criterion"},
        "criterion": {**asdict(search.criterion),
                      "rule": "passes when OK completions >= min_keep_up * arrivals - a and the in-flight "
                              "least-squares rise <= a over the window [warmup_fraction * duration, duration), "
                              "a = noise_sigmas * sqrt(mean in flight) + 1, and arrivals >= min_arrivals_per_allowance * a"},
        "curve": [v.as_dict() for v in result.curve],
    })


def write_report(report: dict[str, Any], out_dir: str) -> Path:
    path = Path(out_dir) / "capacity.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=False))
    return path


def json_clean(x: Any) -> Any:
    """NaN (a metric with no sample) is not JSON: write null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    return x
