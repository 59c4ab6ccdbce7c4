"""Per-step latency of the generation loop: PyTorch eager against ONNX Runtime, side by side.

Both backends run the same loop (runtime.loop.generate) on the same weights, in one process, with
their runs interleaved (torch, ort, torch, ort, ...) so that drift of a shared, noisy machine hits
both alike. What is compared is the ratio, not the absolute times.

    python bench/step_latency.py --preset tiny --runs 20
    python bench/step_latency.py --preset imagefolder-d17 --runs 5 --warmup 1   # random weights

For the official d17 architecture the export takes a few minutes and ~3.5 GB of disk (in --workdir).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagefolder.configs import from_name
from imagefolder.core.bundle import load_bundle
from imagefolder.core.schedule import SamplingParams
from imagefolder.export.onnx_export import export_bundle
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.backends.torch_backend import TorchBackend
from imagefolder.runtime.loop import generate
from imagefolder.runtime.profiler import StepProfiler


def build(preset: str, workdir: Path):
    config = from_name(preset)
    torch.manual_seed(0)
    tokenizer, generator = Tokenizer(config.tokenizer).eval(), Generator(config.generator).eval()
    out = workdir / preset
    if (out / "manifest.json").exists():  # same seed, same weights: reuse an earlier export
        print(f"reusing {out}")
    else:
        t0 = time.perf_counter()
        export_bundle(out, tokenizer, generator, config, batch_max=8)
        print(f"exported {preset} in {time.perf_counter() - t0:.0f} s")
    bundle = load_bundle(out, verify=False)
    return OrtBackend(bundle), TorchBackend(tokenizer, generator, bundle.candidates)


def measure(backends: dict, batch: int, runs: int, warmup: int, params: SamplingParams) -> dict:
    labels = [i % next(iter(backends.values())).num_classes for i in range(batch)]
    profilers = {name: StepProfiler(warmup=warmup) for name in backends}
    sessions = {name: backend.session(batch) for name, backend in backends.items()}
    indices = {}
    for _ in range(warmup + runs):
        for name, backend in backends.items():  # interleaved
            # Let the other library's worker threads stop spinning first (ONNX Runtime's spin after a run
            # and OpenMP's wait policy would otherwise steal the cores from the first stage measured).
            time.sleep(0.2)
            result = generate(backend, labels, params, profiler=profilers[name], session=sessions[name])
            indices[name] = result.indices
    names = list(backends)
    assert np.array_equal(indices[names[0]], indices[names[1]]), "backends disagree on the tokens"
    return {name: profiler.report() for name, profiler in profilers.items()}


def print_table(reports: dict, preset: str, batch: int) -> None:
    torch_r, ort_r = reports["torch"], reports["ort"]
    print(
        f"\n{preset}, batch {batch} (N = {2 * batch} rows with CFG), host wall time, p50 over "
        f"{torch_r['runs']} runs [ms]; ratio = torch / ort"
    )
    print(f"{'stage':<12} {'torch':>9} {'ort':>9} {'ratio':>7}")
    ort_stages = {s["label"]: s for s in ort_r["stages"]}
    for stage in torch_r["stages"]:
        a, b = stage["host_ms"]["p50"], ort_stages[stage["label"]]["host_ms"]["p50"]
        print(f"{stage['label']:<12} {a:>9.2f} {b:>9.2f} {a / b:>7.2f}")
    for key, label in (
        ("time_to_first_scale_ms", "first scale"),
        ("time_per_step_ms", "per step"),
        ("e2e_ms", "end to end"),
    ):
        a, b = (r[key]["host"]["p50"] if "host" in r[key] else r[key]["p50"] for r in (torch_r, ort_r))
        print(f"{label:<12} {a:>9.2f} {b:>9.2f} {a / b:>7.2f}")
    print(
        f"{'images/s':<12} {torch_r['images_per_s']:>9.2f} {ort_r['images_per_s']:>9.2f} "
        f"{ort_r['images_per_s'] / torch_r['images_per_s']:>7.2f}  (ort / torch)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="tiny, imagefolder-d17 (repeatable; default: tiny)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where bundles are exported (default: a temp dir)")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    params = SamplingParams(cfg=3.25, top_k=1, top_p=1.0, seed=0)  # greedy: both must give the same tokens
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for preset in args.preset or ["tiny"]:
            ort_backend, torch_backend = build(preset, workdir)
            reports = measure({"torch": torch_backend, "ort": ort_backend}, args.batch, args.runs, args.warmup, params)
            print_table(reports, preset, args.batch)


if __name__ == "__main__":
    main()
