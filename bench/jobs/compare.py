"""Job ``compare``: bundles of one model side by side on ONNX Runtime, every stage's time and their tokens.

    python -m bench --only compare --bundles build/bench/imagefolder-d17-fp32,/tmp/d17-new --runs 6

For a change to the exported graphs (a new export against the old one, or two export options), the
question is whether each stage got faster and whether the images stayed the same. Each bundle gets its own
``OrtBackend``; they generate in turn (A, B, A, B, ...), 0.2 s apart, so a shared machine's drift hits them
alike; every stage is timed by ``StepProfiler`` (host wall time, p50 over the runs after the warm-up).
Greedy and official (seeded) sampling tokens are compared with the first bundle's. Runs only when asked
for with ``--bundles`` (it measures the user's bundles, not the preset's).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.context import Context
from bench.report import JobResult
from imagefolder.core.bundle import load_bundle
from imagefolder.core.schedule import SamplingParams
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.loop import generate
from imagefolder.runtime.profiler import StepProfiler


def compare(bundles: list[Path], runs: int, warmup: int = 1, batch: int = 1, label: int = 1) -> dict:
    """Per-stage p50 (ms) of each bundle, end to end, and whether its tokens equal the first bundle's."""
    backends = [OrtBackend(path) for path in bundles]
    same_tokens = {}
    for name, params in (("greedy", SamplingParams(top_k=1)), ("seeded", SamplingParams())):
        tokens = [generate(backend, [label] * batch, params).indices for backend in backends]
        same_tokens[name] = [bool(np.array_equal(tokens[0], t)) for t in tokens]
    profilers = [StepProfiler(warmup=warmup) for _ in backends]
    for _ in range(warmup + runs):
        for backend, profiler in zip(backends, profilers, strict=True):
            time.sleep(0.2)  # the other backend's worker threads go idle
            generate(backend, [label] * batch, profiler=profiler)
    reports = [profiler.report() for profiler in profilers]
    stages: dict[str, list[float]] = {}
    for report in reports:
        for stage in report["stages"]:
            stages.setdefault(stage["label"], []).append(stage["host_ms"]["p50"])
    stages["end to end"] = [report["e2e_ms"]["p50"] for report in reports]
    return {"bundles": [str(b) for b in bundles], "batch": batch, "runs": runs, "stages": stages, **same_tokens}


def table(result: dict) -> str:
    """A markdown table: each bundle's ms and the first bundle's time over it (> 1: faster than the first)."""
    names = [f"`{Path(b).name}`" for b in result["bundles"]]
    head = ["stage", *(f"{n} ms" for n in names), *(f"first / {n}" for n in names[1:])]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for stage, times in result["stages"].items():
        if stage.startswith(("sample", "fold")):
            continue  # per-scale sampler and fold rows: in the raw result, not the table
        cells = [f"{t:.1f}" for t in times] + [f"{times[0] / t:.3f}" for t in times[1:]]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    for kind in ("greedy", "seeded"):
        lines.append(f"\n{kind} tokens equal to the first bundle's: {result[kind]}")
    return "\n".join(lines)


def prepare(ctx: Context) -> None:
    for path in ctx.options.bundles:
        load_bundle(path)  # a path that is no bundle, or of an older schema: refused before anything runs


def run(ctx: Context) -> JobResult:
    result = compare(ctx.options.bundles, ctx.options.runs, ctx.options.warmup)
    note = (
        f"batch {result['batch']}, host wall time p50 over {result['runs']} interleaved runs; the machine may have "
        "been shared while this ran: read the ratios"
    )
    return JobResult("compare", "Bundles side by side", result, [table(result)], [note])
