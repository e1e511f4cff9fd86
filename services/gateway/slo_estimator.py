"""What the SLO scheduler predicts: how many tokens a request will still generate, and how long that takes.

Output length (JITServe, "quantile upper bounds refined as tokens arrive"): finished requests' lengths are kept per
feature key — the SLO class and the `max_tokens` the client asked for (clients size `max_tokens` by use case: a chat
turn, a tool step, a report) — in a sliding window. A request's predicted total length is the q-quantile of the
lengths seen for its key, conditioned on what it has already produced:

    L̂(k) = Q_q( { L in window : L > k } ),  clipped to [k + 1, max_tokens]

so a request that outlives most of its peers has its estimate raised instead of sitting at a bound it has passed.
With too few samples for the key, the class's window is used; with none, `max_tokens` (a true upper bound).

Time: a measured time per output token (EWMA over the gaps between token arrivals of every running request) and a
measured first-token delay (EWMA of admission -> first token, which on this server is dominated by the verifier
step in flight, not by the prompt's length).

Plain Python, no clock of its own: every observation carries its time, so tests drive it with hand-picked numbers.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EstimatorConfig:
    quantile: float = 0.9  # an upper bound: under-estimating a length turns a met deadline into a missed one
    window: int = 256  # finished lengths kept per key
    min_samples: int = 8  # below this a key borrows its class's window
    ewma_alpha: float = 0.1
    prior_tpot_s: float = 0.05  # before the first measurement
    prior_first_token_s: float = 0.2

    def __post_init__(self):
        if not 0 < self.quantile <= 1 or self.window < 1 or self.min_samples < 1 or not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"estimator config out of range: {self}")


@dataclass
class _Window:
    lengths: deque[int]
    sorted_: list[int] = field(default_factory=list)  # the same lengths, kept sorted for quantiles

    def add(self, length: int) -> None:
        if len(self.lengths) == self.lengths.maxlen:
            old = self.lengths[0]
            del self.sorted_[bisect.bisect_left(self.sorted_, old)]
        self.lengths.append(length)
        bisect.insort(self.sorted_, length)

    def quantile_above(self, k: int, q: float) -> int | None:
        """Q_q of the lengths > k; None if none is."""
        start = bisect.bisect_right(self.sorted_, k)
        n = len(self.sorted_) - start
        if n == 0:
            return None
        # nearest rank: the smallest length with at least a fraction q of the (conditioned) window at or below it
        rank = min(max(1, math.ceil(q * n - 1e-9)), n)
        return self.sorted_[start + rank - 1]


@dataclass
class _Running:
    admitted_s: float
    num_tokens: int = 0
    last_s: float | None = None  # time of the last token arrival


class Estimator:
    def __init__(self, config: EstimatorConfig | None = None):
        self.config = config or EstimatorConfig()
        self.tpot_s = self.config.prior_tpot_s
        self.first_token_s = self.config.prior_first_token_s
        self._by_key: dict[tuple[str, int], _Window] = {}
        self._by_class: dict[str, _Window] = {}
        self._running: dict[str, _Running] = {}

    # --- output length ------------------------------------------------------------------------------------------

    def output_tokens(self, slo_class: str, max_tokens: int, generated: int = 0) -> int:
        """Predicted total output length of a request that has produced `generated` tokens so far."""
        q, cfg = self.config.quantile, self.config
        estimate = None
        for window in (self._by_key.get((slo_class, max_tokens)), self._by_class.get(slo_class)):
            if window is not None and len(window.lengths) >= cfg.min_samples:
                estimate = window.quantile_above(generated, q)
                break
        if estimate is None:
            return max_tokens
        return max(min(estimate, max_tokens), min(generated + 1, max_tokens))

    def _window(self, table: dict, key) -> _Window:
        if key not in table:
            table[key] = _Window(deque(maxlen=self.config.window))
        return table[key]

    # --- a request's life ---------------------------------------------------------------------------------------

    def admitted(self, request_id: str, now_s: float) -> None:
        self._running[request_id] = _Running(now_s)

    def progress(self, request_id: str, num_tokens: int, now_s: float) -> None:
        """`num_tokens` output tokens have arrived by `now_s` (cumulative)."""
        r = self._running.get(request_id)
        if r is None or num_tokens <= r.num_tokens:
            return
        a = self.config.ewma_alpha
        if r.last_s is None:
            self.first_token_s += a * ((now_s - r.admitted_s) - self.first_token_s)
        else:
            gap_s = (now_s - r.last_s) / (num_tokens - r.num_tokens)
            self.tpot_s += a * (gap_s - self.tpot_s)
        r.num_tokens, r.last_s = num_tokens, now_s

    def finished(self, request_id: str, slo_class: str, max_tokens: int, num_tokens: int, completed: bool) -> None:
        """A request ended; only one that ran to its own end (stop or length) teaches the length model — a
        cancelled one's length says only that it was at least that long."""
        self._running.pop(request_id, None)
        if completed and num_tokens > 0:
            self._window(self._by_key, (slo_class, max_tokens)).add(num_tokens)
            self._window(self._by_class, slo_class).add(num_tokens)

    def resumed(self, request_id: str, now_s: float) -> None:
        """A preempted request goes on: the pause is not time per token."""
        if (r := self._running.get(request_id)) is not None and r.last_s is not None:
            r.last_s = now_s

    def forget(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    # --- time ---------------------------------------------------------------------------------------------------

    def generated(self, request_id: str) -> int:
        r = self._running.get(request_id)
        return 0 if r is None else r.num_tokens

    def remaining_s(self, request_id: str, slo_class: str, max_tokens: int, now_s: float) -> float:
        """Predicted time until a running request finishes, from what it has produced so far."""
        r = self._running.get(request_id)
        if r is None:
            return 0.0
        left = self.output_tokens(slo_class, max_tokens, r.num_tokens) - r.num_tokens
        first = max(0.0, r.admitted_s + self.first_token_s - now_s) if r.last_s is None else 0.0
        return first + left * self.tpot_s
