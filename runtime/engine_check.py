"""``imagefolder-export check BUNDLE --backend trt``: TensorRT engines against ONNX Runtime, through polygraphy.

For every graph, at every scale it serves, polygraphy's ``Comparator`` runs our engine
(``TrtGraphRunner``: the bundle's plan through ``TrtBackend.run_graph``) and ONNX Runtime's CPU
provider (polygraphy's ``OnnxrtRunner``) on the same inputs, and judges each output with the
tolerance ``core.compare`` gives it for "TensorRT against ONNX Runtime" (TF32 and fp16 kernels
differ from the CPU in the last bits; sampled tokens flip only where two scores tie to rounding).
The inputs are ``core.specs.example_inputs`` (labels and tokens in range, the scale's own positions,
uniform noise) rather than polygraphy's random data: the graphs index with them.

With ``debug_dir`` every tensor of each ONNX graph is marked as an output on the ONNX Runtime side
(polygraphy's ``ModifyOutputs``), and for each (graph, scale) that fails, its inputs and ONNX
Runtime's outputs are saved there with the polygraphy command that compares them layer by layer
against an engine rebuilt with every tensor marked. That rebuild is polygraphy's own TensorRT
runner on the GPU: our engines bind exactly the graph's outputs (the runtime refuses others), and
marking a tensor stops TensorRT from fusing across it, so it is a different engine by nature.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagefolder.core import gpu_stack
from imagefolder.core.bundle import Bundle, load_bundle
from imagefolder.core.compare import TOLERANCES, CheckReport, compare_outputs
from imagefolder.core.polygraphy_log import following_our_logging
from imagefolder.core.specs import ORT_CPU_DTYPES, GraphSpec, example_inputs


@dataclass
class OutputJudge:
    """polygraphy ``compare_func``: ``core.compare.compare_outputs`` on the graph's outputs, keeping its rows."""

    spec: GraphSpec
    dtype: str
    weights: str = "fp"  # how the graph's weights are stored: quantized weights get their own tolerance
    rows: dict[str, dict] = field(default_factory=dict)

    def __call__(self, actual, expected) -> dict[str, bool]:
        names = self.spec.output_names
        got, want = {n: actual[n] for n in names}, {n: expected[n] for n in names}
        self.rows = compare_outputs(self.spec, got, want, self.dtype, "ort", self.weights)
        return {name: bool(row["ok"]) for name, row in self.rows.items()}


def check_engines(
    bundle_dir: str | Path, batch: int | None = None, seed: int = 0, debug_dir: str | Path | None = None
) -> CheckReport:
    """Compare every engine in ``BUNDLE/engines`` with ONNX Runtime at every scale it serves.

    Args:
        bundle_dir: a bundle with engines built on this machine.
        batch: images per run (default: the smallest batch the engines were built for).
        seed: seed of the example inputs.
        debug_dir: mark every ONNX tensor as an output and save what bisects each failure here.

    Raises:
        MissingDependency: polygraphy, ONNX Runtime (or, with ``debug_dir``, onnx) is not installed.
    """
    gpu_stack.require("polygraphy", "polygraphy", "(the engine check runs through it)")
    gpu_stack.require("onnxruntime", "ONNX Runtime", "(the engine check compares with it)")
    if debug_dir is not None:
        gpu_stack.require("onnx", "onnx", "(--debug marks every tensor as an output with it)")
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from imagefolder.runtime.backends.trt import TrtBackend
    from imagefolder.runtime.polygraphy_runner import TrtGraphRunner

    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(seed)
    report = CheckReport()
    with TrtBackend(bundle, use_cuda_graphs=False) as backend, following_our_logging():
        precision = judged_precision(bundle.dtype, backend.record)
        built = sorted({p["batch"] for g in backend.record["graphs"].values() for p in g["profiles"]})
        batch = batch or built[0]
        for graph in backend.record["graphs"]:
            spec = bundle.specs[graph]
            if bundle.dtype not in ORT_CPU_DTYPES and not spec.float32_compute:
                continue  # ONNX Runtime's CPU provider has no bf16 kernels to compare with
            ort_runner = OnnxrtRunner(_ort_session(bundle, graph, debug_dir), name=f"onnxrt:{graph}")
            for si in spec.served_scales(bundle.num_scales):
                feeds = example_inputs(spec, bundle.model, batch, si, rng, bundle.state_dtype, bundle.candidates)
                results = Comparator.run([TrtGraphRunner(backend, graph, batch, si), ort_runner], data_loader=[feeds])
                judge = OutputJudge(spec, precision, bundle.graph_weights(graph))
                Comparator.compare_accuracy(results, compare_func=judge)
                report.add(graph, si, judge.rows)
                if debug_dir is not None and not all(row["ok"] for row in judge.rows.values()):
                    report.notes.append(_save_for_bisection(bundle, graph, batch, si, feeds, results, Path(debug_dir)))
    return report


def judged_precision(dtype: str, record: dict) -> str:
    """The row of ``TOLERANCES["ort"]`` engines of a ``dtype`` bundle are judged by: fp32 engines built with
    TF32 (TensorRT's default, recorded in ``engines/build.json``) by the "tf32" row."""
    return "tf32" if dtype == "fp32" and record.get("flags", {}).get("tf32", True) else dtype


def _ort_session(bundle: Bundle, graph: str, debug_dir: str | Path | None):
    """ONNX Runtime's CPU session of one graph; under ``debug_dir``, of a copy with every tensor an output."""
    from polygraphy.backend.onnxrt import SessionFromOnnx

    path = bundle.graph_path(graph)
    if debug_dir is not None:
        from polygraphy import constants
        from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath, SaveOnnx

        marked = Path(debug_dir) / f"{graph}.all-outputs.onnx"
        marked.parent.mkdir(parents=True, exist_ok=True)
        # Saved, not kept as bytes: a graph over protobuf's 2 GB limit is written with external weights.
        SaveOnnx(ModifyOutputs(OnnxFromPath(str(path)), outputs=constants.MARK_ALL), str(marked))()
        path = marked
    return SessionFromOnnx(str(path), providers=["cpu"])()


def _save_for_bisection(
    bundle: Bundle, graph: str, batch: int, si: int | None, feeds: dict, results, debug_dir: Path
) -> str:
    """Save the inputs and ONNX Runtime's outputs of one failing run; return the polygraphy command for the GPU."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    folder = debug_dir / (graph if si is None else f"{graph}-s{si}")
    folder.mkdir(parents=True, exist_ok=True)
    inputs, outputs = folder / "inputs.json", folder / "onnxrt-outputs.json"
    save_json([feeds], str(inputs))
    ort_only = RunResults()
    ort_only.append(results[-1])  # (runner name, iterations) of the ONNX Runtime runner, every tensor included
    ort_only.save(str(outputs))
    shapes = bundle.shapes(graph, batch, si or 0)
    input_shapes = [f"{t.name}:{list(shapes[t.name])}".replace(" ", "") for t in bundle.specs[graph].inputs]
    tolerance = str(TOLERANCES["ort"][bundle.dtype]["relative"])
    command = ["polygraphy", "run", str(bundle.graph_path(graph)), "--trt", "--strongly-typed"]
    command += ["--input-shapes", *input_shapes, "--load-inputs", str(inputs), "--load-outputs", str(outputs)]
    command += ["--trt-outputs", "*", "--atol", tolerance, "--rtol", tolerance]
    where = graph if si is None else f"{graph} at scale {si}"
    return f"{where}: on the GPU, compare every tensor with ONNX Runtime's: {shlex.join(command)}"
