"""``imagefolder-export check BUNDLE --backend trt``: TensorRT engines against ONNX Runtime.

Runs on the target (no torch): every graph gets the same inputs (``core.specs.example_inputs``:
labels and tokens in range, the scale's true positions, uniform noise) on the engine and on ONNX
Runtime's CPU provider, at every scale it serves, and the outputs are compared with the tolerances
of ``core.compare`` for "TensorRT against ONNX Runtime" (TF32 and fp16 kernels differ from the CPU
in the last bits; sampled tokens flip only where two Gumbel scores tie to rounding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imagefolder.core.bundle import load_bundle
from imagefolder.core.compare import CheckReport, compare_outputs
from imagefolder.core.specs import ORT_CPU_DTYPES, example_inputs


def check_engines(bundle_dir: str | Path, batch: int | None = None, seed: int = 0) -> CheckReport:
    """Compare every engine in ``BUNDLE/engines`` with ONNX Runtime at every scale it serves."""
    import onnxruntime as ort

    from imagefolder.runtime.backends.trt import TrtBackend

    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(seed)
    report = CheckReport()
    with TrtBackend(bundle, use_cuda_graphs=False) as backend:
        built = sorted({p["batch"] for g in backend.record["graphs"].values() for p in g["profiles"]})
        batch = batch or built[0]
        for graph in backend.record["graphs"]:
            spec = bundle.specs[graph]
            if bundle.dtype not in ORT_CPU_DTYPES and not spec.float32_compute:
                continue  # ONNX Runtime's CPU provider has no bf16 kernels to compare with
            session = ort.InferenceSession(str(bundle.graph_path(graph)), providers=["CPUExecutionProvider"])
            for si in spec.served_scales(bundle.num_scales):
                feeds = example_inputs(spec, bundle.model, batch, si, rng, bundle.state_dtype, bundle.candidates)
                expected = dict(zip(spec.output_names, session.run(spec.output_names, feeds), strict=True))
                actual = backend.run_graph(graph, feeds, batch, si)
                report.add(
                    graph, si, compare_outputs(spec, actual, expected, bundle.dtype, "ort", bundle.graph_weights(graph))
                )
    return report
