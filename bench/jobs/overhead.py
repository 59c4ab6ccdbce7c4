"""Job ``overhead``: the runtime's own time per image, end to end minus the time inside the graphs.

Split in two: the session's glue (its stages' time minus the graphs': binding buffers, copying each
scale's keys and values into the cache, writing the indices) and the loop's (end to end minus the
stages: the request, the uniforms, the profiler). p50 over runs of the per-run values, per image.
Uses the batch-1 and batch-8 runs of ``roofline`` when it ran; measures batch 1 otherwise.
"""

from __future__ import annotations

from bench.context import Context
from bench.report import JobResult, median, ms, table

BACKENDS = ("torch", "ort")


def prepare(ctx: Context) -> None:
    ctx.torch()
    ctx.ort()


def run(ctx: Context) -> JobResult:
    batches = [b for b in (1, 8) if ctx.has_measured(b)] or [1]
    allot = ctx.budget.allot("overhead")
    raw, rows = {}, []
    for batch in batches:
        measured = ctx.measured(batch, allot)
        for name in BACKENDS:
            m = measured[name]
            per_image = {
                "e2e_ms": median(m.e2e_ms) / batch,
                "graphs_ms": median(m.graphs_ms) / batch,
                "session_ms": median([s - g for s, g in zip(m.stages_ms, m.graphs_ms, strict=True)]) / batch,
                "loop_ms": median([e - s for e, s in zip(m.e2e_ms, m.stages_ms, strict=True)]) / batch,
            }
            overhead = median([e - g for e, g in zip(m.e2e_ms, m.graphs_ms, strict=True)]) / batch
            per_image["overhead_ms"] = overhead
            raw[f"{name}/{batch}"] = per_image
            rows.append(
                [
                    f"{name}, batch {batch}",
                    ms(per_image["e2e_ms"]),
                    ms(per_image["graphs_ms"]),
                    ms(per_image["session_ms"]),
                    ms(per_image["loop_ms"]),
                    ms(overhead),
                    f"{overhead / per_image['e2e_ms']:.1%}",
                ]
            )
    headers = ["per image", "end to end ms", "in graphs", "session glue", "loop", "overhead", "share"]
    notes = [
        "in graphs: ONNX Runtime's `run` calls (ort); the models' prefill, step, sampler, embed_scale, "
        "next_scale_input and indices_to_img (torch); overhead = end to end − in graphs (p50 of per-run values)",
    ]
    return JobResult("overhead", "The runtime's own overhead", raw, [table(headers, rows)], notes)
