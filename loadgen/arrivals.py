"""Open-loop arrival processes: when each trajectory starts, independent of how fast the server answers.

Gaps between arrivals are drawn from a gamma distribution with shape k and scale 1/(rate·k): the mean gap is 1/rate
whatever k is, and the coefficient of variation is 1/√k. k = 1 is the exponential, i.e. a Poisson process; k < 1
is burstier (clumps of arrivals, then silences), k > 1 smoother. This is the parameterisation of vLLM's
`benchmark_serving --burstiness`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specrelay.shared.errors import ConfigError


@dataclass(frozen=True)
class ArrivalProcess:
    rate: float  # trajectories per second
    burstiness: float = 1.0  # gamma shape k

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ConfigError(f"--rate must be positive, got {self.rate:g}")
        if not self.burstiness > 0:
            raise ConfigError(f"--burstiness must be positive, got {self.burstiness:g}")

    @property
    def name(self) -> str:
        return "poisson" if self.burstiness == 1.0 else "gamma"

    def gaps(self, count: int, seed: int) -> np.ndarray:  # [count] seconds between consecutive arrivals
        rng = np.random.default_rng(seed)
        return rng.gamma(shape=self.burstiness, scale=1.0 / (self.rate * self.burstiness), size=count)

    def schedule(self, count: int, seed: int) -> np.ndarray:  # [count] seconds from the run's start
        """Arrival times; the first trajectory starts at once, as in vLLM's benchmark."""
        times = np.cumsum(self.gaps(count, seed))
        return times - times[0] if count else times

    def schedule_until(self, duration_s: float, seed: int, max_count: int = 10_000_000) -> np.ndarray:
        """Arrival times within [0, duration_s): the same sequence as `schedule`, cut at the duration."""
        count = max(16, int(self.rate * duration_s * 1.5) + 16)
        while True:
            times = self.schedule(min(count, max_count), seed)
            if times[-1] >= duration_s or count >= max_count:
                return times[times < duration_s]
            count *= 2
