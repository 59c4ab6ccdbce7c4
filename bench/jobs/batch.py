"""Job ``batch``: images/s at batch 1, 2, 4 and 8, torch and ort interleaved, beside the floor's images/s
(batch ÷ the sum of the stages' floors)."""

from __future__ import annotations

from bench.context import BATCHES, Context
from bench.report import JobResult, ratio, table

BACKENDS = ("torch", "ort")


def prepare(ctx: Context) -> None:
    ctx.torch()
    ctx.ort()


def run(ctx: Context) -> JobResult:
    allot = ctx.budget.allot("batch")
    todo = [b for b in BATCHES if not ctx.has_measured(b)]
    work = sum(todo) or 1
    raw, rows = {}, []
    for batch in BATCHES:
        measured = ctx.measured(batch, allot * batch / work)
        floor_ms = sum(f.ms for f in ctx.floors(batch).values())
        rates = {name: measured[name].report["images_per_s"] for name in BACKENDS}
        floor_rate = batch / floor_ms * 1e3
        raw[batch] = {"floor_images_per_s": floor_rate, **rates, "runs": measured["ort"].report["runs"]}
        rows.append(
            [
                str(batch),
                f"{floor_rate:.3g}",
                *(cell for name in BACKENDS for cell in (f"{rates[name]:.3g}", ratio(floor_rate / rates[name]))),
                ratio(rates["ort"] / rates["torch"]),
            ]
        )
    headers = ["batch", "floor images/s", "torch images/s", "×floor", "ort images/s", "×floor", "ort / torch"]
    notes = [
        "images/s = images ÷ end-to-end time over the measured runs (`StepProfiler`); ×floor = the floor's "
        "images/s ÷ the measured ones, i.e. the time per image as a multiple of its floor",
    ]
    return JobResult("batch", "Batch scaling", raw, [table(headers, rows)], notes)
