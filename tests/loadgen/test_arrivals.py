import numpy as np
import pytest

from specrelay.loadgen.arrivals import ArrivalProcess
from specrelay.shared.errors import ConfigError


@pytest.mark.parametrize("rate, burstiness", [(4.0, 1.0), (0.5, 1.0), (10.0, 0.25), (2.0, 4.0)])
def test_arrivals_match_their_rate_and_burstiness(rate, burstiness):
    gaps = ArrivalProcess(rate, burstiness).gaps(40_000, seed=7)
    # Mean gap 1/rate whatever the shape; coefficient of variation 1/sqrt(k) (k = 1: exponential, Poisson).
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0 / np.sqrt(burstiness), rel=0.05)


def test_poisson_counts_per_window_have_variance_equal_to_mean():
    times = ArrivalProcess(20.0).schedule_until(500.0, seed=3)
    counts = np.bincount(times.astype(int), minlength=500)
    assert counts.mean() == pytest.approx(20.0, rel=0.03)
    assert counts.var() == pytest.approx(20.0, rel=0.2)


def test_bursty_arrivals_clump_more_than_poisson():
    poisson = np.bincount(ArrivalProcess(20.0).schedule_until(300.0, seed=1).astype(int)).var()
    bursty = np.bincount(ArrivalProcess(20.0, 0.2).schedule_until(300.0, seed=1).astype(int)).var()
    assert bursty > 3 * poisson


def test_schedules_are_seeded_start_at_zero_and_cut_at_the_duration():
    a = ArrivalProcess(5.0, 0.5)
    assert np.array_equal(a.schedule(50, seed=11), a.schedule(50, seed=11))
    assert not np.array_equal(a.schedule(50, seed=11), a.schedule(50, seed=12))
    assert a.schedule(50, seed=11)[0] == 0.0
    until = a.schedule_until(4.0, seed=11)
    assert until.max() < 4.0
    assert np.array_equal(until, a.schedule(len(until), seed=11))  # the same sequence, cut


@pytest.mark.parametrize("rate, k", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_bad_parameters_are_clear_errors(rate, k):
    with pytest.raises(ConfigError, match="must be positive"):
        ArrivalProcess(rate, k)
