"""Capacity: the highest open-loop arrival rate a server sustains, judged from what one run at each rate recorded
(plain Python; the live runs are in capacity_run.py).

A run offers Poisson arrivals at rate λ for D seconds (`--duration`). Its steady window is [w·D, D), w =
`warmup_fraction` (0.25: the first quarter is the queue filling up to its level), T = (1 − w)·D long. In the window:

- N = trajectories that arrived; C = trajectories that finished with no failed request;
- the number in flight (started and not yet finished, failed or not; a cancelled one stays in flight) is sampled
  at `num_samples` (100) evenly spaced instants; m is its mean, and `rise` the least-squares line's slope times T,
  i.e. how much it grew over the window;
- the noise allowance is a = 2·√m + 1 trajectories: an unsaturated server's in-flight count is about Poisson with
  mean m (Little's law, M/G/∞), so two of its standard deviations, plus one for counting whole trajectories.

A rate **passes** when both hold:
1. it keeps up: C ≥ 0.95·N − a (`min_keep_up`; C falls short of N by the change in flight between the window's
   ends, which is why the allowance is there; the counts are the realised ones, so the Poisson noise of the
   arrivals themselves cancels);
2. its queue does not grow: rise ≤ a;
3. it is long enough to tell: N ≥ 5·a (`min_arrivals_per_allowance`). When trajectories are long next to the
   window (m large against N), the allowance swallows the shortfall and tests 1 and 2 pass an overloaded server:
   on SmolLM2, 60 s runs of 60 s trajectories passed rates three times what the server completed. Such a run
   fails as too short, so a short `--duration` underestimates capacity and never overestimates it.
An overloaded server (service rate μ < λ) completes about μ·T and its queue grows by (λ − μ)·T, so both tests
fail once λ exceeds μ by a few percent of a window's worth of trajectories: the longer the run, the sharper.

**Capacity** is the highest rate that passed. Search: from `start_rate`, the rate is multiplied by `growth` while
it passes (divided while the first rates fail), then bisected geometrically (√(good·bad)) between the last passing
and the first failing rate until bad/good ≤ 1 + `precision`, within `max_rates` runs in all.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from specrelay.shared.errors import ConfigError


@dataclass(frozen=True)
class CapacityCriterion:
    warmup_fraction: float = 0.25  # the start of each run left out of the judgement
    min_keep_up: float = 0.95  # OK completions / arrivals in the window (less the noise allowance)
    num_samples: int = 100  # in-flight samples over the window
    noise_sigmas: float = 2.0  # the allowance: noise_sigmas·√m + 1 trajectories
    min_arrivals_per_allowance: float = 5.0  # N / a below this: the window is too short to judge

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warm-up fraction must be in [0, 1), got {self.warmup_fraction:g}")
        if not 0 < self.min_keep_up <= 1:
            raise ConfigError(f"keep-up threshold must be in (0, 1], got {self.min_keep_up:g}")
        if self.num_samples < 3:
            raise ConfigError(f"need at least 3 in-flight samples, got {self.num_samples}")


@dataclass(frozen=True)
class Trace:
    """What one run recorded: every start, and every finish with whether all of its requests succeeded."""

    rate: float  # offered (trajectories/s)
    duration_s: float  # arrivals were offered during [0, duration_s)
    arrivals_s: list[float]  # seconds since the run began, cancelled trajectories included
    finishes: list[tuple[float, bool]]  # (seconds since the run began, ok)


@dataclass
class Verdict:
    rate: float
    window_s: float
    num_arrivals: int  # N
    num_completed: int  # C
    offered_per_s: float  # N / T
    achieved_per_s: float  # C / T
    mean_in_flight: float  # m
    in_flight_rise: float  # least-squares rise of the in-flight count over the window
    allowance: float  # a = noise_sigmas·√m + 1
    keeps_up: bool
    queue_flat: bool
    long_enough: bool  # N ≥ min_arrivals_per_allowance·a
    # Filled in by a live run (capacity_run.py); a judged trace alone has none.
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    num_failed_requests: int | None = None
    records: str | None = None

    @property
    def passed(self) -> bool:
        return self.keeps_up and self.queue_flat and self.long_enough

    def as_dict(self) -> dict:
        return {**{k: v for k, v in vars(self).items()}, "passed": self.passed}


def in_flight(starts: list[float], ends: list[float], t: float) -> int:
    """Started at or before t and not finished by t; both lists sorted."""
    return bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t)


def judge(trace: Trace, criterion: CapacityCriterion = CapacityCriterion()) -> Verdict:
    lo, hi = criterion.warmup_fraction * trace.duration_s, trace.duration_s
    window = hi - lo
    starts = sorted(trace.arrivals_s)
    ends = sorted(t for t, _ in trace.finishes)
    n = sum(lo <= t < hi for t in starts)
    if n == 0:
        raise ConfigError(f"rate {trace.rate:g}/s offered no trajectory in its {window:g} s steady window: "
                          f"raise --duration or the start rate")
    completed = sum(lo <= t < hi and ok for t, ok in trace.finishes)
    times = [lo + window * i / (criterion.num_samples - 1) for i in range(criterion.num_samples)]
    counts = [in_flight(starts, ends, t) for t in times]
    slope, _ = statistics.linear_regression(times, counts)
    m = statistics.fmean(counts)
    allowance = criterion.noise_sigmas * math.sqrt(m) + 1.0
    rise = slope * window
    return Verdict(
        rate=trace.rate, window_s=window, num_arrivals=n, num_completed=completed, offered_per_s=n / window,
        achieved_per_s=completed / window, mean_in_flight=m, in_flight_rise=rise, allowance=allowance,
        keeps_up=completed >= criterion.min_keep_up * n - allowance, queue_flat=rise <= allowance,
        long_enough=n >= criterion.min_arrivals_per_allowance * allowance,
    )


@dataclass(frozen=True)
class CapacitySearch:
    start_rate: float  # trajectories/s of the first run
    duration_s: float = 180.0  # each run offers arrivals this long: minutes, so a slow queue has time to build
    growth: float = 2.0  # the rate's factor between runs until the first failure
    precision: float = 0.1  # bisect until first failing / last passing <= 1 + precision
    max_rates: int = 10  # runs in all
    drain_s: float = 30.0  # after the window, in-flight trajectories get this long before they are cancelled
    criterion: CapacityCriterion = field(default_factory=CapacityCriterion)

    def __post_init__(self) -> None:
        if not self.start_rate > 0:
            raise ConfigError(f"the start rate must be positive, got {self.start_rate:g}")
        if not self.duration_s > 0:
            raise ConfigError(f"the capacity duration must be positive, got {self.duration_s:g}")
        if not self.growth > 1:
            raise ConfigError(f"the rate growth must be above 1, got {self.growth:g}")
        if not self.precision > 0:
            raise ConfigError(f"the precision must be positive, got {self.precision:g}")
        if self.max_rates < 2:
            raise ConfigError(f"the search needs at least 2 rates, got {self.max_rates}")
        if self.drain_s < 0:
            raise ConfigError(f"the drain must not be negative, got {self.drain_s:g}")


@dataclass
class CapacityResult:
    capacity: float | None  # the highest rate that passed; None: none did
    first_failing: float | None  # the lowest rate that failed above it; None: every rate passed
    curve: list[Verdict]  # in the order run

    @property
    def bracketed(self) -> bool:
        return self.capacity is not None and self.first_failing is not None


async def search_capacity(search: CapacitySearch, probe: Callable[[float], Awaitable[Verdict]],
                          log: Callable[[str], None] = print) -> CapacityResult:
    """Rise (or fall) geometrically to the first change of verdict, then bisect; `probe(rate)` runs one rate."""
    good: float | None = None
    bad: float | None = None
    curve: list[Verdict] = []
    rate = search.start_rate
    while len(curve) < search.max_rates:
        verdict = await probe(rate)
        curve.append(verdict)
        log(format_verdict(verdict))
        if verdict.passed:
            good = rate
        else:
            bad = rate
        if good is None:
            rate /= search.growth
        elif bad is None:
            rate *= search.growth
        elif bad / good <= 1 + search.precision:
            break
        else:
            rate = math.sqrt(good * bad)  # the geometric midpoint: the bracket's ratio halves in log terms
    return CapacityResult(good, bad, curve)


def format_verdict(v: Verdict) -> str:
    why = ((["falls behind"] if not v.keeps_up else []) + (["queue grows"] if not v.queue_flat else [])
           + (["too short to judge: raise --duration"] if not v.long_enough else []))
    return (f"rate {v.rate:.4g}/s: achieved {v.achieved_per_s:.4g} of {v.offered_per_s:.4g}/s offered, in flight "
            f"{v.mean_in_flight:.1f} rising {v.in_flight_rise:+.1f} (allowed {v.allowance:.1f}): "
            f"{'passes' if v.passed else 'fails (' + ', '.join(why) + ')'}")


def format_curve(result: CapacityResult) -> str:
    rows = [("rate/s", "offered/s", "achieved/s", "in flight", "rise", "allowed", "TTFT p50 ms", "TTFT p99 ms",
             "failed req", "verdict")]
    for v in sorted(result.curve, key=lambda v: v.rate):
        rows.append((f"{v.rate:.4g}", f"{v.offered_per_s:.4g}", f"{v.achieved_per_s:.4g}", f"{v.mean_in_flight:.1f}",
                     f"{v.in_flight_rise:+.1f}", f"{v.allowance:.1f}", _ms(v.ttft_p50_ms), _ms(v.ttft_p99_ms),
                     "-" if v.num_failed_requests is None else str(v.num_failed_requests),
                     "pass" if v.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if result.capacity is None:
        lines.append(f"capacity: no rate passed (lowest tried {min(v.rate for v in result.curve):.4g}/s)")
    elif result.first_failing is None:
        lines.append(f"capacity: at least {result.capacity:.4g} trajectories/s (every rate tried passed)")
    else:
        lines.append(f"capacity: {result.capacity:.4g} trajectories/s (fails at {result.first_failing:.4g}/s)")
    return "\n".join(lines)


def _ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.0f}"
