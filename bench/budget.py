"""The run's time budget: progress lines stamped with the time spent, and each job's share of what is left.

``make bench`` must finish within its budget on two cores, so every measurement is sized from the time
it is allotted (``bench.timing.Plan``) instead of a fixed run count. The one-time work comes first
(models, exports, the calibration), then each measuring job is allotted its share of the time that
remains at its start, less a reserve for the end of the run, among the jobs not yet run.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# The measuring jobs' shares of the time left after the one-time work.
SHARES = {"roofline": 0.36, "batch": 0.24, "overhead": 0.04, "folding": 0.16, "dtypes": 0.20, "pruning": 0.25}
RESERVE = 0.03  # of the budget, for the floor's drift check and writing the results


class Budget:
    """Seconds allowed for the whole run, and the progress lines (to stderr)."""

    def __init__(self, total_s: float, stream: TextIO = sys.stderr):
        self.total_s, self.stream = total_s, stream
        self.start = time.perf_counter()
        self.jobs_left: list[str] = []

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    @property
    def remaining_s(self) -> float:
        return self.total_s - self.elapsed_s

    def say(self, message: str) -> None:
        print(f"[{self.elapsed_s:5.0f} s / {self.total_s:.0f} s] {message}", file=self.stream, flush=True)

    def plan(self, jobs: list[str]) -> None:
        """The measuring jobs that will run, in order."""
        self.jobs_left = [job for job in jobs if job in SHARES]

    def allot(self, job: str) -> float:
        """Seconds for ``job``'s measurements (asked once, when it starts)."""
        shares = sum(SHARES[j] for j in self.jobs_left) or 1.0
        seconds = max(0.0, self.remaining_s - RESERVE * self.total_s) * SHARES[job] / shares
        self.jobs_left.remove(job)
        self.say(f"{job}: {seconds:.0f} s allotted")
        return seconds
