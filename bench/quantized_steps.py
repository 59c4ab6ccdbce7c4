"""Quantized generator weights on ONNX Runtime (CPU): logit error per step, speed per step, bundle size.

One model (random weights, seed 0) is exported three times, with fp32, int8 and int4 generator
weights (``imagefolder-export onnx --weights``). Then, in one process:

- logit error: each step graph runs on the same inputs (real hidden states of the PyTorch model,
  as the export's parity check makes them) and its logits are compared with the fp32 bundle's:
  max |Δ| / max |ref| (the parity metric), mean |Δ| / mean |ref|, and how often the arg-max of a
  row's branch logits stays the same;
- speed: the three bundles generate in turn (fp32, int8, int4, fp32, ...) with greedy sampling,
  0.2 s apart, every stage timed (``runtime.profiler.StepProfiler``);
- size: every file of each bundle, and the stored weight bytes of each quantized graph;
- kernels: one d17-sized MatMul (2 rows × 1088 → 4352, one thread) as the pass writes it, at ONNX
  Runtime's default ``session.qdq_matmulnbits_accuracy_level`` 4 (DequantizeLinear → MatMul fused
  into ``MatMulNBits``, activations rounded to int8 per block) and at 0 (fp32 activations).

    python bench/quantized_steps.py --preset imagefolder-d17 --runs 3 --warmup 1 --workdir /tmp/wq
    python bench/quantized_steps.py --preset tiny --runs 20

The d17 exports take a few minutes each and ~3.5 GB (fp32) + ~2 GB (int8, int4) of disk in --workdir.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from imagefolder.configs import from_name
from imagefolder.core.bundle import load_bundle
from imagefolder.core.schedule import SamplingParams
from imagefolder.export.onnx_export import ExampleInputs, export_bundle
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.loop import generate
from imagefolder.runtime.profiler import StepProfiler

SCHEMES = ("fp", "int8", "int4")
KERNEL_SHAPE = (2, 1088, 4352)  # rows, K, N: the d17 MLP's first matmul at q = 1 with guidance


def export_all(preset: str, workdir: Path) -> tuple[dict[str, Path], Tokenizer, Generator]:
    """The three bundles of ``preset`` (seed 0 weights), exported unless an earlier run left them."""
    config = from_name(preset)
    torch.manual_seed(0)
    tokenizer, generator = Tokenizer(config.tokenizer).eval(), Generator(config.generator).eval()
    bundles = {}
    for weights in SCHEMES:
        out = workdir / f"{preset}-{weights}"
        if not (out / "manifest.json").exists():
            t0 = time.perf_counter()
            export_bundle(out, tokenizer, generator, config, weights=weights, progress=False)
            print(f"exported {out.name} in {time.perf_counter() - t0:.0f} s")
        bundles[weights] = out
    return bundles, tokenizer, generator


def logit_errors(bundles: dict[str, Path], tokenizer: Tokenizer, generator: Generator) -> None:
    """Per step graph and scale: the quantized bundles' logits against the fp32 bundle's, same inputs."""
    manifest = load_bundle(bundles["fp"], verify=False)
    examples = ExampleInputs(tokenizer, generator, manifest.model, manifest.candidates, seed=2)
    v = manifest.codebook_size
    print("\nlogits against the fp32 bundle (batch 1, N = 2 rows; real hidden states, random earlier tokens)")
    print(f"{'graph':<13} {'weights':<7} {'max rel':>8} {'mean rel':>9} {'argmax same':>12}")
    for graph in ("ar_prefill", "ar_step"):
        spec = manifest.specs[graph]
        sessions = {w: ort.InferenceSession(str(path / f"{graph}.onnx")) for w, path in bundles.items()}
        for si in spec.served_scales(manifest.num_scales):
            inputs = examples.for_graph(spec, 1, si)
            feeds = {
                t.name: x.numpy().astype(t.resolved_dtype("float32")) for t, x in zip(spec.inputs, inputs, strict=True)
            }
            logits = {w: s.run(["logits"], feeds)[0].astype(np.float64) for w, s in sessions.items()}
            ref = logits["fp"]
            for weights in SCHEMES[1:]:
                got = logits[weights]
                same = (got.reshape(-1, v).argmax(-1) == ref.reshape(-1, v).argmax(-1)).mean()
                print(
                    f"{graph + ('' if si is None else f'[{si}]'):<13} {weights:<7} "
                    f"{np.abs(got - ref).max() / np.abs(ref).max():>8.3f} "
                    f"{np.abs(got - ref).mean() / np.abs(ref).mean():>9.3f} {same:>12.3f}"
                )
        del sessions


def speed(bundles: dict[str, Path], runs: int, warmup: int, batch: int) -> None:
    """Interleaved greedy generation on the three bundles; p50 host time per stage."""
    backends = {w: OrtBackend(path) for w, path in bundles.items()}
    labels = [i % backends["fp"].num_classes for i in range(batch)]
    params = SamplingParams(cfg=3.25, top_k=1, top_p=1.0, seed=0)
    profilers = {w: StepProfiler(warmup=warmup) for w in backends}
    sessions = {w: backend.session(batch) for w, backend in backends.items()}
    indices = {}
    for _ in range(warmup + runs):
        for w, backend in backends.items():
            time.sleep(0.2)  # let the previous session's worker threads stop spinning
            indices[w] = generate(backend, labels, params, profiler=profilers[w], session=sessions[w]).indices
    reports = {w: p.report() for w, p in profilers.items()}
    print(f"\nONNX Runtime CPU, batch {batch}, host wall time p50 over {runs} runs [ms]; ratio = fp32 / quantized")
    print(f"{'stage':<13} {'fp32':>9} {'int8':>9} {'int4':>9} {'fp/int8':>8} {'fp/int4':>8}")
    per_stage = {w: {s["label"]: s["host_ms"]["p50"] for s in r["stages"]} for w, r in reports.items()}
    rows = [label for label in per_stage["fp"] if not label.startswith(("sample", "fold"))]
    derived = {
        "first scale": "time_to_first_scale_ms",
        "per step": "time_per_step_ms",
        "end to end": "e2e_ms",
    }
    for label in rows + list(derived):
        if label in derived:
            key = derived[label]
            t = {w: r[key]["host"]["p50"] if "host" in r[key] else r[key]["p50"] for w, r in reports.items()}
        else:
            t = {w: per_stage[w][label] for w in per_stage}
        print(
            f"{label:<13} {t['fp']:>9.2f} {t['int8']:>9.2f} {t['int4']:>9.2f} "
            f"{t['fp'] / t['int8']:>8.2f} {t['fp'] / t['int4']:>8.2f}"
        )
    for w in SCHEMES[1:]:
        print(f"greedy tokens equal to fp32's ({w}): {(indices[w] == indices['fp']).mean():.3f}")


def sizes(bundles: dict[str, Path]) -> None:
    """Bundle and graph sizes, and the parity against PyTorch each export recorded (worst output)."""
    print(f"\n{'bundle':<8} {'all files MB':>13} {'ar_prefill MB':>14} {'ar_step MB':>11} {'parity max rel':>15}")
    for w, path in bundles.items():
        manifest = load_bundle(path, verify=False).manifest
        total = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
        graphs = {g: manifest["graphs"][g] for g in ("ar_prefill", "ar_step")}
        mb = {g: e["weights"]["bytes"] / 1e6 for g, e in graphs.items()}
        parity = max(o["value"] for e in graphs.values() for o in e["parity"]["outputs"].values())
        print(f"{w:<8} {total:>13.1f} {mb['ar_prefill']:>14.1f} {mb['ar_step']:>11.1f} {parity:>15.4f}")


def kernels(workdir: Path) -> None:
    """Time one MatMul per weight format and ONNX Runtime accuracy level, single-threaded."""
    from onnx import TensorProto, helper, numpy_helper, save

    from imagefolder.export.onnx_files import raise_opset
    from imagefolder.export.quantize import quantize_graph

    rows, k, n = KERNEL_SHAPE
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((0.02 * rng.standard_normal((k, n))).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [weight])
    feeds = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
    print(f"\none MatMul {rows}×{k} → {n}, one thread, mean of 200 runs [ms] (accuracy level: ORT's option)")
    for weights in SCHEMES:
        path = workdir / f"matmul-{weights}.onnx"
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        if weights != "fp":
            raise_opset(path, 21 if weights == "int4" else 17)
            quantize_graph(path, weights)
        for level in ("4", "0") if weights != "fp" else ("-",):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            if level != "-":
                options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for _ in range(10):
                session.run(None, feeds)
            start = time.perf_counter()
            for _ in range(200):
                session.run(None, feeds)
            print(f"{weights:<5} accuracy level {level}: {(time.perf_counter() - start) / 200 * 1e3:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny, imagefolder-d17, ...")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="where the bundles are exported (default: a temp dir)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        kernels(workdir)
        bundles, tokenizer, generator = export_all(args.preset, workdir)
        sizes(bundles)
        logit_errors(bundles, tokenizer, generator)
        speed(bundles, args.runs, args.warmup, args.batch)


if __name__ == "__main__":
    main()
