"""The adaptive tree budget: how many nodes to verify this step, learned from this device and these requests.

Throughput of a step with n nodes per request at batch size B is

    tokens/s(n) = B · (1 + Â(n)) / (t_draft + t_verify(B·n))

Â(n) is the mean number of accepted tokens when only the first n nodes of the tree are kept (tree order is the
drafter's greedy order, so a prefix is a tree): every verification measures it for all n up to the tree it verified.
t_verify(m) is the target's forward time over m tokens, measured on this device (the cost curve that Sequoia sizes
trees by: nearly flat on a GPU, steep on a small CPU). The budget is chosen *before* drafting, from history only, so
it never depends on what the drafter draws (which keeps sampling lossless). As B grows, t_verify(B·n) climbs the
curve and the best n shrinks. Every `explore_every` steps the full budget is tried to keep Â(n) current.
"""

from __future__ import annotations

import bisect


class CostCurve:
    """Forward seconds against tokens in the forward: an exponential moving average per measured size, linear
    interpolation between sizes, flat extrapolation below and linear above."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.sizes: list[int] = []
        self.seconds: list[float] = []

    def observe(self, num_tokens: int, seconds: float) -> None:
        i = bisect.bisect_left(self.sizes, num_tokens)
        if i < len(self.sizes) and self.sizes[i] == num_tokens:
            self.seconds[i] += self.smoothing * (seconds - self.seconds[i])
        else:
            self.sizes.insert(i, num_tokens)
            self.seconds.insert(i, seconds)

    def predict(self, num_tokens: int) -> float:
        if not self.sizes:
            return float(num_tokens)  # no measurement yet: assume cost grows with tokens
        i = bisect.bisect_left(self.sizes, num_tokens)
        if i < len(self.sizes) and self.sizes[i] == num_tokens:
            return self.seconds[i]
        if i == 0:
            return self.seconds[0]
        if i == len(self.sizes):
            if len(self.sizes) == 1:
                return self.seconds[0] * num_tokens / self.sizes[0]
            (x0, x1), (y0, y1) = self.sizes[-2:], self.seconds[-2:]
        else:
            (x0, x1), (y0, y1) = self.sizes[i - 1 : i + 1], self.seconds[i - 1 : i + 1]
        return max(y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0), 1e-9)


class AdaptiveBudget:
    def __init__(self, max_nodes: int, smoothing: float = 0.1, explore_every: int = 16, warmup_steps: int = 4):
        self.max_nodes = max_nodes
        self.smoothing = smoothing
        self.explore_every = explore_every
        self.warmup_steps = warmup_steps
        self.verify_cost = CostCurve()
        self.draft_seconds = 0.0
        self.accepted = [0.0] * (max_nodes + 1)  # Â(n), n = 0..max_nodes (Â(0) = Â(1) = 0)
        self.observed = [False] * (max_nodes + 1)
        self.steps = 0

    def choose(self, batch_size: int) -> int:
        self.steps += 1
        if self.max_nodes <= 1:
            return 1
        if self.steps <= self.warmup_steps or self.steps % self.explore_every == 0:
            return self.max_nodes
        largest = max(n for n in range(self.max_nodes + 1) if n <= 1 or self.observed[n])
        best_n, best_rate = 1, 0.0
        for n in range(1, largest + 1):
            rate = (1 + self.accepted[n]) / (self.draft_seconds * (n > 1) + self.verify_cost.predict(batch_size * n))
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def observe_verify(self, num_tokens: int, seconds: float) -> None:
        self.verify_cost.observe(num_tokens, seconds)

    def observe_draft(self, seconds: float) -> None:
        self.draft_seconds += self.smoothing * (seconds - self.draft_seconds)

    def observe_acceptance(self, accepted_nodes: list[int], num_nodes: int) -> None:
        """accepted_nodes: tree indices of the accepted path (increasing). With only the first n nodes kept, the
        same walk accepts exactly the path nodes whose index is < n."""
        for n in range(1, min(num_nodes, self.max_nodes) + 1):
            kept = sum(1 for i in accepted_nodes if i < n)
            if self.observed[n]:
                self.accepted[n] += self.smoothing * (kept - self.accepted[n])
            else:
                self.accepted[n], self.observed[n] = float(kept), True
