"""The machine's floor, measured in the same run as the benchmarks: GEMM GFLOP/s at the model's shapes
and memory read GB/s, and from them the floor of every stage of a generation.

- GEMM: every distinct (batch, m, k, n) product of the stages (``bench.cost``) is timed with
  ``torch.matmul`` on fp32 tensors (oneDNN/MKL sgemm), with ``torch.set_num_threads(T)`` where T is
  the number of physical cores this process may use: ONNX Runtime's default intra-op thread count
  (the ort backend runs with its defaults) and what the torch backend gets. Best of repeated calls
  over a minimum time: a floor is what the machine can do, and on a shared machine the best call is
  the least disturbed. ``contention`` compares T threads with one on a few shapes: on a machine whose
  cores other tenants hold, T threads can be many times slower than one, for the floor and the
  backends alike.
- Memory: a sum over a float32 array of twice the last-level cache (at least 256 MiB, at most 2 GiB),
  so it streams from DRAM, with the same T threads; best of five.

The floor of a stage is max(Σ FLOPs_i / rate(shape_i), bytes read / memory rate): its products at the
rates measured for their shapes, or its weights and inputs read once at the memory rate, whichever
takes longer. A multiple of 1 means the stage runs as fast as a plain matmul of its shapes (or a
plain read of its bytes) on this machine; small stages whose weights stay in cache can go below 1.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from bench.cost import StageCost, distinct_gemms
from bench.machine import last_level_cache_bytes

Shape = tuple[int, int, int, int]  # (batch, m, k, n)
MIN_ARRAY, MAX_ARRAY = 256 * 2**20, 2 * 2**30


def _best_seconds(fn: Callable[[], object], min_s: float, budget_s: float, min_repeats: int = 3) -> float:
    """Best wall time of ``fn`` after one warm-up: at least ``min_repeats`` calls and ``min_s`` seconds of
    them, at most ``budget_s`` seconds (one call at least). Many short calls give the best a chance to
    land between the other tenants' time slices."""
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < min_repeats or spent < min_s:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
        if spent > budget_s:
            break
    return best


def memory_read_gbs(threads: int, nbytes: int | None = None, repeats: int = 5) -> float:
    """GB/s of a sum over a float32 array larger than the caches."""
    if nbytes is None:
        nbytes = min(max(2 * (last_level_cache_bytes() or 0), MIN_ARRAY), MAX_ARRAY)
    torch.set_num_threads(threads)
    array = torch.ones(nbytes // 4, dtype=torch.float32)  # written once, so every page is resident
    seconds = _best_seconds(lambda: array.sum(), 0.0, budget_s=2.0, min_repeats=repeats)
    return array.numel() * 4 / seconds / 1e9


def gemm_gflops(
    shapes: Iterable[Shape], threads: int, min_s: float = 0.05, progress: Callable[[int, int], None] | None = None
) -> dict:
    """GFLOP/s of ``torch.matmul`` for each (batch, m, k, n), fp32, on ``threads`` threads; each shape is
    timed for at least ``min_s`` seconds (at most 0.3 s after its first call)."""
    torch.set_num_threads(threads)
    shapes = list(shapes)
    rates: dict[Shape, float] = {}
    generator = torch.Generator().manual_seed(0)
    for done, (batch, m, k, n) in enumerate(shapes):
        lead = (batch,) if batch > 1 else ()
        a = torch.randn(*lead, m, k, generator=generator)
        b = torch.randn(*lead, k, n, generator=generator)
        seconds = _best_seconds(functools.partial(torch.matmul, a, b), min_s, budget_s=max(0.3, min_s))
        rates[(batch, m, k, n)] = 2 * batch * m * k * n / seconds / 1e9
        if progress is not None:
            progress(done + 1, len(shapes))
    return rates


def contention(shapes: list[Shape], threads: int, min_s: float = 0.05) -> dict[Shape, float]:
    """GEMM rate on ``threads`` threads ÷ on one, per shape. Below 1, the threads wait for each other:
    other tenants hold the cores, and every parallel kernel (ONNX Runtime's too) pays for it."""
    one = gemm_gflops(shapes, 1, min_s)
    many = gemm_gflops(shapes, threads, min_s)
    return {shape: many[shape] / one[shape] for shape in shapes}


@dataclass(frozen=True)
class StageFloor:
    """A stage's cost and its floor at the measured rates."""

    flops: int
    bytes_read: int
    compute_ms: float  # Σ FLOPs_i / rate(shape_i)
    memory_ms: float  # bytes read / memory rate

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"

    @property
    def gemm_gflops(self) -> float:
        """The stage's effective GEMM rate: its FLOPs over the time its products take at the measured rates."""
        return self.flops / self.compute_ms / 1e6 if self.compute_ms else float("nan")

    def to_dict(self) -> dict:
        return {
            "ms": self.ms,
            "compute_ms": self.compute_ms,
            "memory_ms": self.memory_ms,
            "bound": self.bound,
            "flops": self.flops,
            "bytes_read": self.bytes_read,
        }


def stage_floor(cost: StageCost, gemm_rates: dict, memory_gbs: float) -> StageFloor:
    compute_s = sum(g.flops / (gemm_rates[g.shape] * 1e9) for g in cost.gemms)
    return StageFloor(cost.flops, cost.bytes_read, compute_s * 1e3, cost.bytes_read / (memory_gbs * 1e9) * 1e3)


def floors(costs: dict[str, StageCost], gemm_rates: dict, memory_gbs: float) -> dict[str, StageFloor]:
    """The floor of every stage of ``costs`` (labels kept)."""
    return {label: stage_floor(cost, gemm_rates, memory_gbs) for label, cost in costs.items()}


def shapes_of(costs: Iterable[dict[str, StageCost]]) -> list[Shape]:
    """Every distinct product shape of several generations' stages (the calibration's work list)."""
    return distinct_gemms(cost for stages in costs for cost in stages.values())
