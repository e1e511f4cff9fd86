"""A coarse live check of `loadgen capacity` against the in-process fake server: one slot, 50 ms a request, so it
can never complete more than 20 a second. A rate of under a third of that passes (22 arrivals in its window: enough to judge); three times it fails. The exact
criterion is tested on simulated traces (test_capacity.py); nothing here sits near the threshold."""

import json

from specrelay.loadgen.capacity import CapacitySearch
from specrelay.loadgen.capacity_run import capacity_report, measure_capacity, write_report
from specrelay.loadgen.runner import RunConfig


async def test_a_rate_far_below_capacity_passes_and_one_far_above_fails(serve_fake, fake, tmp_path):
    url, state = await serve_fake(fake.FakeBehaviour(num_tokens=1, ttft_s=0.05, max_concurrency=1))
    base = RunConfig(endpoint=url, workload="chat", progress=False)
    search = CapacitySearch(start_rate=6.0, duration_s=6.0, growth=10.0, max_rates=2, drain_s=0.3)
    lines = []
    result = await measure_capacity(base, search, url, str(tmp_path), lines.append)
    below, above = result.curve
    assert (below.rate, above.rate) == (6.0, 60.0)
    assert below.passed and below.num_failed_requests == 0
    assert not above.keeps_up and not above.queue_flat
    assert above.achieved_per_s <= 20.0 * 1.05  # the fake cannot do more than one request per 50 ms
    assert above.in_flight_rise > 20  # ~40/s more arrive than leave over the 4.5 s window
    assert (result.capacity, result.first_failing) == (6.0, 60.0)
    assert lines[0].endswith("passes") and "fails (falls behind, queue grows)" in lines[1]

    report = capacity_report(result, base, search)
    path = write_report(report, str(tmp_path))
    assert json.loads(path.read_text()) == report
    assert report["capacity_trajectories_per_s"] == 6.0 and report["search"]["duration_s"] == 6.0
    assert [p["passed"] for p in report["curve"]] == [True, False]
    assert report["curve"][0]["ttft_p50_ms"] >= 50.0  # the fake's service time is the first token's delay
    assert report["curve"][1]["records"] == "capacity-60.jsonl" and (tmp_path / "capacity-60.jsonl").exists()
