"""How long a client-side tool pause lasts, learned per tool name.

A pause runs from a turn ending with `finish_reason: "tool_calls"` to the conversation's next request. For each
key (a tool name, or the sorted names of a turn that called several, joined with '+') we keep an exponentially
weighted mean and the last `window` observations:

  * `expected_s()` — the EWMA mean: keeping KV costs memory × time, linear in the pause, so its mean is what the
    expected cost needs.
  * `quantile_s(q)` — from the window: when a kept conversation is still paused at its q-quantile it has entered
    the tail, and the coordinator decides again (`RetentionDecision.recheck_after_s`).
  * `expected_remaining_s(elapsed)` — E[T − t | T > t] over the window: what is left of a pause that has already
    lasted t. Beyond every observation the pause is assumed to last about as long again as it already has
    (a heavy-tail guess: a human who has been away ten minutes is not back in one).
  * `staged_keep(elapsed, rate, evict)` — the best horizon for "keep until h, then evict": for a tool that is
    usually quick but sometimes waits on a person it beats both keeping through and evicting at once (the
    ski-rental trade-off, solved on the observed distribution instead of for the worst case).

A key never seen falls back to the longest estimate among its single tools, then to the configured prior.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable


def pause_key(tool_names: Iterable[str]) -> str:
    return "+".join(sorted(set(tool_names))) or "<none>"


@dataclass
class PauseStats:
    ewma_s: float
    alpha: float = 0.2
    window: int = 128
    count: int = 0
    samples: deque[float] = field(default_factory=deque)

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        # The first observation replaces the prior outright; later ones move the mean by alpha.
        self.ewma_s = seconds if self.count == 0 else (1 - self.alpha) * self.ewma_s + self.alpha * seconds
        self.count += 1
        self.samples.append(seconds)
        while len(self.samples) > self.window:
            self.samples.popleft()

    def expected_s(self) -> float:
        return self.ewma_s

    def quantile_s(self, q: float) -> float:
        if not self.samples:
            return self.ewma_s
        ordered = sorted(self.samples)
        # Nearest-rank quantile: the smallest observation with at least q of the window at or below it.
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]

    def staged_keep(self, elapsed_s: float, keep_rate: float, evict_cost: float) -> tuple[float, float] | None:
        """The best plan "keep until horizon h, then evict if still paused" over the observed pauses longer than
        `elapsed_s`: (h, expected cost) minimising

            keep_rate · E[min(T, h) − t | T > t]  +  P(T > h | T > t) · evict_cost

        over h ∈ those observations (the cost only changes slope there). None when fewer than two remain."""
        longer = sorted(x - elapsed_s for x in self.samples if x > elapsed_s)
        n = len(longer)
        if n < 2:
            return None
        best: tuple[float, float] | None = None
        prefix = 0.0  # Σ of the remaining pauses up to and including index k
        for k, x in enumerate(longer):
            prefix += x
            if k + 1 < n and longer[k + 1] == x:
                continue  # ties: evaluate once, after the last equal value
            held = (prefix + (n - k - 1) * x) / n
            cost = keep_rate * held + (n - k - 1) / n * evict_cost
            if best is None or cost < best[1]:
                best = (elapsed_s + x, cost)
        return best

    def expected_remaining_s(self, elapsed_s: float) -> float:
        if elapsed_s <= 0:
            return self.ewma_s
        longer = [x - elapsed_s for x in self.samples if x > elapsed_s]
        if longer:
            return sum(longer) / len(longer)
        if not self.samples and elapsed_s < self.ewma_s:
            return self.ewma_s - elapsed_s
        return max(elapsed_s, self.ewma_s)


@dataclass
class PauseEstimator:
    prior_s: float = 5.0  # an unseen tool's expected pause
    priors: dict[str, float] = field(default_factory=dict)  # per tool name, e.g. {"human": 120.0}
    alpha: float = 0.2
    window: int = 128
    stats: dict[str, PauseStats] = field(default_factory=dict)

    def observe(self, tool_names: Iterable[str], seconds: float) -> None:
        key = pause_key(tool_names)
        if key not in self.stats:
            self.stats[key] = PauseStats(ewma_s=self._prior(key), alpha=self.alpha, window=self.window)
        self.stats[key].observe(seconds)

    def _prior(self, key: str) -> float:
        return self.priors.get(key, self.prior_s)

    def _lookup(self, tool_names: Iterable[str]) -> list[PauseStats]:
        """The stats that describe this set of tools: its own key if seen, else each seen single tool."""
        names = sorted(set(tool_names))
        key = pause_key(names)
        if key in self.stats:
            return [self.stats[key]]
        return [self.stats.get(name) or PauseStats(ewma_s=self._prior(name)) for name in names] or [
            PauseStats(ewma_s=self.prior_s)]

    def expected_s(self, tool_names: Iterable[str]) -> float:
        return max(s.expected_s() for s in self._lookup(tool_names))

    def quantile_s(self, tool_names: Iterable[str], q: float) -> float:
        return max(s.quantile_s(q) for s in self._lookup(tool_names))

    def expected_remaining_s(self, tool_names: Iterable[str], elapsed_s: float) -> float:
        return max(s.expected_remaining_s(elapsed_s) for s in self._lookup(tool_names))

    def staged_keep(self, tool_names: Iterable[str], elapsed_s: float, keep_rate: float,
                    evict_cost: float) -> tuple[float, float] | None:
        """`PauseStats.staged_keep` of the slowest stats describing these tools."""
        slowest = max(self._lookup(tool_names), key=lambda s: s.expected_remaining_s(elapsed_s))
        return slowest.staged_keep(elapsed_s, keep_rate, evict_cost)
