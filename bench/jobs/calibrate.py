"""Job ``calibrate``: the machine's floor (memory read GB/s, GEMM GFLOP/s at the model's shapes) and
the effective GEMM rate of each step, at batch 1 and 8."""

from __future__ import annotations

import math

from bench import calibrate
from bench.context import Context
from bench.report import JobResult, table


def prepare(ctx: Context) -> None:
    ctx.models()


def run(ctx: Context) -> JobResult:
    calib = ctx.calibrated()
    threads = (
        "the physical cores: ONNX Runtime's default intra-op pool"
        if ctx.options.ort_threads is None
        else "--threads: ONNX Runtime's intra-op pool set alike"
    )
    rates = sorted(calib.gemm_gflops.values())
    floors = {batch: ctx.floors(batch) for batch in (1, 8)}
    steps = [label for label in floors[1] if label.startswith("step")]
    rows = [
        [label, *(f"{floors[b][label].gemm_gflops:.0f}" for b in (1, 8)), *(floors[b][label].bound for b in (1, 8))]
        for label in steps
    ]
    notes = [
        f"memory read: **{calib.memory_gbs:.1f} GB/s** (sum over a float32 array of twice the last-level cache); "
        f"GEMM: {calibrate.GEMM_SOURCE} on {calib.threads} thread(s) ({threads}), "
        f"{len(rates)} shapes from {_rate(rates[0])} to **{_rate(rates[-1])} GFLOP/s**; "
        f"calibration took {calib.seconds:.0f} s",
        "effective rate of a stage = its FLOPs ÷ Σ FLOPs of each product ÷ the rate measured for its shape",
    ]
    notes.append(contention_note(calib.threads, calib.contention))
    measured = [r for r in calib.contention.values() if math.isfinite(r) and r > 0]
    if measured and min(measured) < 1:
        notes.append(
            f"**{calib.threads} threads are slower than 1 on some shapes: other tenants hold the cores and the "
            "threads wait for each other. Floors and backends pay alike; compare multiples and ratios, and "
            "rerun on a quiet machine for absolute numbers.**"
        )
    return JobResult(
        "calibrate",
        "Floor calibration",
        {
            "threads": calib.threads,
            "memory_gbs": calib.memory_gbs,
            "gemm_gflops": [[*shape, rate] for shape, rate in calib.gemm_gflops.items()],
            "contention": [[*shape, r] for shape, r in calib.contention.items()],
            "min_seconds_per_shape": calib.min_s,
            "seconds": calib.seconds,
        },
        [table(["stage", "GEMM GFLOP/s, batch 1", "batch 8", "bound, batch 1", "batch 8"], rows)],
        notes,
    )


def _rate(value: float) -> str:
    """Three significant digits: a rate under load can be far below 1 GFLOP/s, which ``.0f`` prints as 0."""
    return f"{value:.3g}" if math.isfinite(value) else "?"


def contention_note(threads: int, contention: dict) -> str:
    """The calibration's contention line: the rate ratio with the digits that matter, or why there is none."""
    if not contention:
        return f"contention not measured: the floor runs on {threads} thread, there is nothing to compare with"
    if not all(math.isfinite(r) and r > 0 for r in contention.values()):
        return (
            f"contention could not be measured: a {threads}-thread or 1-thread GEMM time was zero or not finite "
            "(a clock too coarse for these shapes)"
        )
    ratios = ", ".join(f"{r:.2g}× at {_shape(s)}" for s, r in contention.items())
    return f"{threads} threads against 1 (GEMM rate on {threads} threads ÷ on one): {ratios}"


def _shape(shape: tuple[int, int, int, int]) -> str:
    batch, m, k, n = shape
    return f"({m}×{k})·({k}×{n})" if batch == 1 else f"{batch}×({m}×{k})·({k}×{n})"
