"""The machine's floor, measured in the same run as the benchmarks: GEMM GFLOP/s at the model's shapes
and memory read GB/s, and from them the floor of every stage of a generation.

- GEMM: every distinct (batch, m, k, n) product of the stages (``bench.cost``) is timed in both
  libraries the backends use, fp32, and the faster one sets the rate: ``torch.matmul`` (oneDNN/MKL
  sgemm) with ``torch.set_num_threads(T)``, and a one-node ONNX Runtime ``MatMul`` (MLAS) whose
  second operand is a constant, as the weights are in the bundle's graphs (prepacked), on an
  intra-op pool of T threads without spinning, as the ort backend runs. T is the number of physical
  cores this process may use: ONNX Runtime's default intra-op thread count and what the torch
  backend gets. Which library is faster depends on the processor (on an AMD EPYC, MLAS was up to
  2.5× faster than torch's sgemm at 2–72 rows; on a Xeon with AVX-512 the two were within 20 %), and a
  floor is what the machine can do. Best of repeated calls over a minimum time: on a shared machine
  the best call is the least disturbed. ``contention`` compares T threads with one on a few shapes: on a machine whose
  cores other tenants hold, T threads can be many times slower than one, for the floor and the
  backends alike.
- Memory: a sum over a float32 array of twice the last-level cache (at least 256 MiB, at most 2 GiB),
  so it streams from DRAM, with the same T threads; best of five.

The floor of a stage is max(Σ FLOPs_i / rate(shape_i), bytes read / memory rate): its products at the
rates measured for their shapes, or its weights and inputs read once at the memory rate, whichever
takes longer. A multiple of 1 means the stage runs as fast as the faster library's plain matmuls of
its shapes (or a plain read of its bytes) on this machine; small stages whose weights stay in cache can go below 1.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from bench.cost import StageCost, distinct_gemms
from bench.machine import last_level_cache_bytes

Shape = tuple[int, int, int, int]  # (batch, m, k, n)
MIN_ARRAY, MAX_ARRAY = 256 * 2**20, 2 * 2**30
LIBRARIES = ("torch", "ort")  # the GEMMs the two backends run; the faster sets a shape's rate
GEMM_SOURCE = "the faster of torch.matmul and ONNX Runtime's MatMul (constant weight), fp32"


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


def _ort_matmul(a: np.ndarray, b: np.ndarray, threads: int) -> Callable[[], object]:
    """A call of ONNX Runtime's MatMul on ``a`` with the constant ``b`` (an initializer, as a weight)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(b, "b")],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return functools.partial(session.run, None, {"a": a})


def _matmul_call(library: str, a: torch.Tensor, b: torch.Tensor, threads: int) -> Callable[[], object]:
    if library == "torch":
        return functools.partial(torch.matmul, a, b)
    if library == "ort":
        return _ort_matmul(a.numpy(), b.numpy(), threads)
    raise ValueError(f"unknown GEMM library {library!r}: one of {LIBRARIES}")


def gemm_gflops(
    shapes: Iterable[Shape],
    threads: int,
    min_s: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
    libraries: tuple[str, ...] = LIBRARIES,
) -> dict[Shape, float]:
    """GFLOP/s of the faster of ``libraries`` (torch.matmul, ONNX Runtime's MatMul with a constant second
    operand) for each (batch, m, k, n), fp32, on ``threads`` threads; each shape and library is timed for
    at least ``min_s`` seconds (at most 0.3 s after its first call)."""
    torch.set_num_threads(threads)
    shapes = list(shapes)
    rates: dict[Shape, float] = {}
    generator = torch.Generator().manual_seed(0)
    for done, (batch, m, k, n) in enumerate(shapes):
        lead = (batch,) if batch > 1 else ()
        a = torch.randn(*lead, m, k, generator=generator)
        b = torch.randn(*lead, k, n, generator=generator)
        seconds = min(
            _best_seconds(_matmul_call(library, a, b, threads), min_s, budget_s=max(0.3, min_s))
            for library in libraries
        )
        rates[(batch, m, k, n)] = 2 * batch * m * k * n / seconds / 1e9
        if progress is not None:
            progress(done + 1, len(shapes))
    return rates


def contention(shapes: list[Shape], threads: int, min_s: float = 0.05) -> dict[Shape, float]:
    """GEMM rate on ``threads`` threads ÷ on one, per shape. Below 1, the threads wait for each other:
    other tenants hold the cores, and every parallel kernel (ONNX Runtime's too) pays for it."""
    one = gemm_gflops(shapes, 1, min_s, libraries=("torch",))
    many = gemm_gflops(shapes, threads, min_s, libraries=("torch",))
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
