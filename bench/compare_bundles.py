"""Bundles of one model side by side on ONNX Runtime: every stage's time, interleaved, and their tokens.

For a change to the exported graphs (a new export against the old one, or two export options), the
question is whether each stage got faster and whether the images stayed the same. Each bundle gets
its own ``OrtBackend``; they generate in turn (A, B, A, B, ...), 0.2 s apart, so a shared machine's
drift hits them alike; every stage is timed by ``StepProfiler`` (host wall time, p50 over the runs
after the warm-up). Greedy and official (seeded) sampling tokens are compared with the first bundle's.

    python bench/compare_bundles.py build/bench/imagefolder-d17-fp32 /tmp/d17-new --runs 6
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import ImagefolderError
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", type=Path, nargs="+", help="two or more bundles of the same model")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    if len(args.bundles) < 2:
        parser.error("give at least two bundles")
    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--runs and --batch must be ≥ 1, --warmup ≥ 0")
    try:
        result = compare(args.bundles, args.runs, args.warmup, args.batch)
    except ImagefolderError as err:  # a path that is no bundle, an old schema, a batch above its maximum
        parser.exit(2, f"Error: {err}\n")
    print(f"batch {result['batch']}, host wall time p50 over {result['runs']} interleaved runs\n")
    print(table(result))


if __name__ == "__main__":
    main()
