"""A one-line progress bar on stderr, redrawn in place; silent when stderr is not a terminal (logs, CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class ProgressBar:
    def __init__(self, total: float, unit: str, *, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(total, 1e-9)
        self.unit = unit
        self.start = time.monotonic()
        self._last_draw = 0.0

    def update(self, done: float, *, requests: int, errors: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(1.0, done / self.total)
        filled = int(frac * WIDTH)
        done_text = f"{done:.0f}/{self.total:.0f} {self.unit}"
        self.stream.write(f"\r[{'#' * filled}{'.' * (WIDTH - filled)}] {done_text}  {requests} requests  "
                          f"{errors} errors  {now - self.start:.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
