"""The capacity criterion and search on a simulated server whose capacity is known exactly: k slots, each request
served in a fixed time, first come first served, so capacity = k / service time. Simulated time: nothing here
depends on how fast this machine is."""

import heapq
import math

import pytest

from specrelay.loadgen.arrivals import ArrivalProcess
from specrelay.loadgen.capacity import (
    CapacityCriterion, CapacitySearch, Trace, format_curve, format_verdict, in_flight, judge, search_capacity,
)
from specrelay.shared.errors import ConfigError


def simulate(rate, duration_s, slots, service_s, seed=0, fail=False):
    """A FIFO server with `slots` slots; arrivals are Poisson; a request still queued at the end never finishes."""
    arrivals = [float(t) for t in ArrivalProcess(rate).schedule_until(duration_s, seed)]
    free = [0.0] * slots
    finishes = []
    for t in arrivals:
        start = max(t, heapq.heappop(free))
        heapq.heappush(free, start + service_s)
        finishes.append((start + service_s, not fail))
    return Trace(rate=rate, duration_s=duration_s, arrivals_s=arrivals, finishes=finishes)


def sim_probe(duration_s, slots, service_s):
    async def probe(rate):
        return judge(simulate(rate, duration_s, slots, service_s))
    return probe


def test_in_flight_counts_started_and_not_finished():
    assert [in_flight([0.0, 1.0, 2.0], [1.5, 3.0], t) for t in (0.0, 1.0, 1.5, 2.5, 3.0)] == [1, 2, 1, 2, 1]


def test_a_server_below_capacity_passes_and_one_above_fails_for_the_stated_reasons():
    # 4 slots x 0.5 s: capacity 8/s. 600 s of simulated arrivals.
    below = judge(simulate(6.0, 600, 4, 0.5))
    assert below.passed and below.keeps_up and below.queue_flat
    assert below.achieved_per_s == pytest.approx(below.offered_per_s, rel=0.02)
    assert below.offered_per_s == pytest.approx(6.0, rel=0.1)
    above = judge(simulate(8.8, 600, 4, 0.5))  # 10% over: the queue grows by 0.8/s
    assert not above.keeps_up and not above.queue_flat
    assert above.achieved_per_s == pytest.approx(8.0, rel=0.02)
    assert above.in_flight_rise == pytest.approx((above.offered_per_s - 8.0) * above.window_s, rel=0.1)
    assert "fails (falls behind, queue grows)" in format_verdict(above)


def test_a_server_that_fails_fast_keeps_its_queue_flat_but_does_not_keep_up():
    v = judge(simulate(2.0, 300, 4, 0.5, fail=True))
    assert v.queue_flat and not v.keeps_up and v.num_completed == 0


def test_the_window_leaves_out_the_warm_up():
    # 10/s, each trajectory 20 s: the number in flight climbs to 200 over the first 20 s, then stays there.
    arrivals = [i * 0.1 for i in range(1000)]
    trace = Trace(10.0, 100.0, arrivals, [(t + 20.0, True) for t in arrivals])
    steady = judge(trace)  # window [25, 100)
    assert steady.passed and steady.mean_in_flight == pytest.approx(200, abs=1)
    assert abs(steady.in_flight_rise) < 1 and steady.num_completed == steady.num_arrivals == 750
    with_ramp = judge(trace, CapacityCriterion(warmup_fraction=0.0))
    assert not with_ramp.queue_flat and not with_ramp.keeps_up


def test_a_run_short_next_to_its_trajectories_fails_as_too_short_instead_of_passing_an_overloaded_server():
    # 8 slots x 60 s: capacity 0.133/s, offered 0.4/s (3x). A 60 s run ends before any trajectory does: the
    # allowance (m ~ 8) hides the shortfall from the first two tests; the third names the cause.
    short = judge(simulate(0.4, 60, 8, 60.0, seed=3))
    assert short.num_arrivals < 5 * short.allowance and not short.long_enough and not short.passed
    assert "too short to judge: raise --duration" in format_verdict(short)
    # A run long enough to judge fails the overloaded server on its own merits.
    long = judge(simulate(0.4, 1800, 8, 60.0, seed=3))
    assert long.long_enough and not long.keeps_up and not long.queue_flat


@pytest.mark.parametrize("slots, service_s, start_rate", [(4, 0.5, 1.0), (1, 0.2, 20.0), (16, 2.0, 0.3)])
async def test_the_search_finds_the_known_capacity_within_10_percent(slots, service_s, start_rate):
    capacity = slots / service_s
    search = CapacitySearch(start_rate=start_rate, duration_s=600.0, growth=2.0, precision=0.05, max_rates=12)
    result = await search_capacity(search, sim_probe(600.0, slots, service_s), log=lambda line: None)
    assert result.bracketed
    assert 0.9 * capacity <= result.capacity <= 1.02 * capacity
    assert result.first_failing / result.capacity <= 1.05
    assert result.first_failing > capacity * 0.98
    rates = [v.rate for v in result.curve]
    assert rates[0] == start_rate and len(rates) <= 12
    table = format_curve(result)
    assert f"capacity: {result.capacity:.4g} trajectories/s (fails at {result.first_failing:.4g}/s)" in table


async def test_a_search_that_never_fails_or_never_passes_says_so():
    unbounded = await search_capacity(CapacitySearch(start_rate=1.0, max_rates=3),
                                      sim_probe(200.0, 64, 0.5), log=lambda line: None)
    assert [v.rate for v in unbounded.curve] == [1.0, 2.0, 4.0] and not unbounded.bracketed
    assert "capacity: at least 4 trajectories/s (every rate tried passed)" in format_curve(unbounded)
    hopeless = await search_capacity(CapacitySearch(start_rate=8.0, max_rates=3),
                                     sim_probe(200.0, 1, 10.0), log=lambda line: None)
    assert [v.rate for v in hopeless.curve] == [8.0, 4.0, 2.0] and hopeless.capacity is None
    assert "no rate passed (lowest tried 2/s)" in format_curve(hopeless)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="growth must be above 1"):
        CapacitySearch(start_rate=1.0, growth=1.0)
    with pytest.raises(ConfigError, match="at least 2 rates"):
        CapacitySearch(start_rate=1.0, max_rates=1)
    with pytest.raises(ConfigError, match="warm-up fraction"):
        CapacityCriterion(warmup_fraction=1.0)
    with pytest.raises(ConfigError, match="offered no trajectory"):
        judge(Trace(0.001, 10.0, [0.0], [(0.5, True)]))
    assert math.isfinite(judge(Trace(1.0, 10.0, [3.0], [(3.5, True)])).in_flight_rise)
