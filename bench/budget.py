"""The run's time budget: progress lines stamped with the time spent, and each job's share of what is left.

``make bench`` must finish within its budget on two cores, so every measurement is sized from the time
it is allotted (``bench.timing.Plan``) instead of a fixed run count. A job is allotted its share of
the budget, but never more than an even split of what remains between it and the jobs after it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# The share of the budget each measuring job may spend on its runs (exports and the calibration
# come out of the rest; at d17 they take about a third of a 20-minute budget on two cores).
SHARES = {"roofline": 0.22, "batch": 0.14, "folding": 0.09, "dtypes": 0.12, "overhead": 0.04}


class Budget:
    """Seconds allowed for the whole run, and the progress lines (to stderr)."""

    def __init__(self, total_s: float, stream: TextIO = sys.stderr):
        self.total_s, self.stream = total_s, stream
        self.start = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    @property
    def remaining_s(self) -> float:
        return self.total_s - self.elapsed_s

    def say(self, message: str) -> None:
        print(f"[{self.elapsed_s:5.0f} s / {self.total_s:.0f} s] {message}", file=self.stream, flush=True)

    def allot(self, job: str, jobs_left: int) -> float:
        """Seconds for ``job``'s measurements: its share, within an even split of what remains."""
        return max(0.0, min(SHARES[job] * self.total_s, self.remaining_s / max(jobs_left, 1)))
