"""Job ``roofline``: every stage of a generation at batch 1 and 8, torch and ort interleaved, beside its
floor (``bench.calibrate``): time p50 and its multiple of the floor."""

from __future__ import annotations

from bench.context import Context
from bench.report import JobResult, median, ms, ratio, table

BATCHES = {1: 0.25, 8: 0.75}  # batch: its share of the job's time (batch 8 does 8× the work)
BACKENDS = ("torch", "ort")


def prepare(ctx: Context) -> None:
    ctx.torch()
    ctx.ort()


def run(ctx: Context) -> JobResult:
    allot = ctx.budget.allot("roofline")
    raw: dict = {}
    tables = []
    for batch, share in BATCHES.items():
        measured = ctx.measured(batch, allot * share)
        floors = ctx.floors(batch)
        stages = {name: {s["label"]: s["host_ms"] for s in measured[name].report["stages"]} for name in BACKENDS}
        rows, entries = [], {}
        for label, floor in floors.items():
            times = {name: stages[name][label]["p50"] for name in BACKENDS}
            entries[label] = {"floor": floor.to_dict(), **{name: stages[name][label] for name in BACKENDS}}
            rows.append(
                [
                    label,
                    f"{floor.flops / 1e9:.3g}",
                    f"{floor.bytes_read / 1e6:.3g}",
                    floor.bound,
                    ms(floor.ms),
                    *(cell for name in BACKENDS for cell in (ms(times[name]), ratio(times[name] / floor.ms))),
                ]
            )
        total = sum(f.ms for f in floors.values())
        e2e = {name: median(measured[name].e2e_ms) for name in BACKENDS}
        rows.append(
            ["**end to end**", "", "", "", ms(total)]
            + [cell for name in BACKENDS for cell in (ms(e2e[name]), ratio(e2e[name] / total))]
        )
        runs = measured["ort"].report["runs"]
        raw[batch] = {"stages": entries, "floor_ms": total, "e2e_ms": e2e, "runs": runs}
        tables.append(
            f"Batch {batch} ({2 * batch} rows with guidance), host wall time p50 over {runs} runs:\n\n"
            + table(["stage", "GFLOP", "MB read", "bound", "floor ms", "torch ms", "×floor", "ort ms", "×floor"], rows)
        )
    notes = [
        "floor = max(Σ GEMM FLOPs at the rates measured for their shapes, bytes read ÷ memory rate); "
        "formulas in `bench/cost.py`; the end-to-end floor is the sum of the stages' floors",
        "a multiple below 1 means the stage beat a plain matmul of its shapes or a read of its bytes from DRAM "
        "(its weights stayed in cache)",
        "the sampler's floor holds its two blocked cumulative sums and one read of the logits; its TopK, softmax, "
        "scatter and masks are element-wise passes over tensors the size of the logits, which the floor leaves out "
        "and its multiple shows",
    ]
    return JobResult("roofline", "Roofline: each stage against the machine's floor", raw, tables, notes)
