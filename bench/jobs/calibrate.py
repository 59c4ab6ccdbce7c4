"""Job ``calibrate``: the machine's floor (memory read GB/s, GEMM GFLOP/s at the model's shapes) and
the effective GEMM rate of each step, at batch 1 and 8."""

from __future__ import annotations

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
        f"{len(rates)} shapes from {rates[0]:.0f} to **{rates[-1]:.0f} GFLOP/s**; "
        f"calibration took {calib.seconds:.0f} s",
        "effective rate of a stage = its FLOPs ÷ Σ FLOPs of each product ÷ the rate measured for its shape",
    ]
    if calib.contention:
        ratios = ", ".join(f"{r:.2f}× at {_shape(s)}" for s, r in calib.contention.items())
        notes.append(f"{calib.threads} threads against 1 (GEMM rate ratio): {ratios}")
        if min(calib.contention.values()) < 1:
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


def _shape(shape: tuple[int, int, int, int]) -> str:
    batch, m, k, n = shape
    return f"({m}×{k})·({k}×{n})" if batch == 1 else f"{batch}×({m}×{k})·({k}×{n})"
