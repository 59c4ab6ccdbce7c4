"""``imagefolder-export check BUNDLE --backend trt``: TensorRT engines against ONNX Runtime.

Runs on the target (no torch): every graph gets the same random inputs, drawn to look like real
ones (labels and tokens in range, the scale's true positions, uniform noise), on the engine and on
ONNX Runtime's CPU provider, and the outputs are compared per scale with the bundle dtype's
tolerance. Engines built with TF32 or fp16 kernels differ from the CPU in the last bits, which the
tolerances allow for; integer outputs (indices, tokens) report the fraction that differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imagefolder.export.check_report import CheckReport
from imagefolder.export.opcheck import check_operators
from imagefolder.export.specs import ORT_CPU_DTYPES

# Relative error allowed between an engine and ONNX Runtime, per bundle dtype.
TRT_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 1e-1}
INDEX_TOLERANCE = {"fp32": 0.01, "fp16": 0.1, "bf16": 0.2}


def random_feeds(bundle, graph: str, batch: int, scale_index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Plausible inputs for one graph at one (batch, scale), from the manifest alone."""
    shapes = bundle.shapes(graph, batch, scale_index)
    gen = bundle.model["generator"]
    spans = bundle.spans
    feeds = {}
    for tensor in bundle.manifest["graphs"][graph]["inputs"]:
        name, dtype, shape = tensor["name"], np.dtype(tensor["dtype"]), shapes[tensor["name"]]
        if name == "labels":
            labels = rng.integers(0, gen["num_classes"], batch)
            value = np.concatenate([labels, np.full(batch, gen["num_classes"])])
        elif name in ("tokens", "indices"):
            value = rng.integers(0, gen["codebook_size"], shape)
        elif name == "positions":
            start, q = spans[scale_index]
            value = np.arange(start, start + q)
        elif name == "next_positions":
            start, q = spans[min(scale_index + 1, len(spans) - 1)]
            value = np.arange(start, start + q)
        elif name == "scale_index":
            value = np.array([scale_index])
        elif name in ("noise", "image"):
            value = rng.random(shape) * (2 if name == "image" else 1) - (1 if name == "image" else 0)
        elif name == "guidance":
            value = np.array([1.5])
        elif name == "top_k":
            value = np.array([min(50, bundle.candidates)])
        elif name == "top_p":
            value = np.array([0.9])
        else:  # hidden states: the magnitudes of real activations are O(1)
            value = rng.standard_normal(shape) * (3 if name == "logits" else 0.5)
        feeds[name] = np.ascontiguousarray(value, dtype=dtype)
    return feeds


def check_engines(bundle_dir: str | Path, batch: int | None = None, seed: int = 0) -> CheckReport:
    """Compare every engine in ``BUNDLE/engines`` with ONNX Runtime at every scale it serves."""
    import onnxruntime as ort

    from imagefolder.runtime.backends.trt import TrtBackend
    from imagefolder.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    dtype = bundle.dtype
    rng = np.random.default_rng(seed)
    report = CheckReport()
    num_scales = bundle.num_scales
    scale_ranges = {"ar_step": range(1, num_scales), "sampler": range(num_scales), "fold": range(num_scales)}
    with TrtBackend(bundle, use_cuda_graphs=False) as backend:
        built = sorted({p["batch"] for g in backend.record["graphs"].values() for p in g["profiles"]})
        batch = batch or built[0]
        for graph in backend.record["graphs"]:
            path = bundle.graph_path(graph)
            report.operators[graph] = check_operators(path)
            if dtype not in ORT_CPU_DTYPES and graph not in ("sampler", "fold"):
                continue  # ONNX Runtime's CPU provider has no bf16 kernels to compare with
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for si in scale_ranges.get(graph, [0]):
                feeds = random_feeds(bundle, graph, batch, si, rng)
                expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
                actual = backend.run_graph(graph, feeds, batch, si if graph in scale_ranges else None)
                for name, want in expected.items():
                    got = actual[name]
                    if np.issubdtype(want.dtype, np.integer):
                        # Sampled tokens flip only where two Gumbel scores tie to rounding (rare).
                        limit = 1e-3 if graph == "sampler" else INDEX_TOLERANCE[dtype]
                        value, metric = float((got != want).mean()), "mismatch"
                    else:
                        limit = TRT_TOLERANCE[dtype]
                        diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
                        value, metric = float(diff / (np.abs(want).max() or 1.0)), "max_rel"
                    report.rows.append({"graph": graph, "scale": si, "output": name, "metric": metric,
                                        "value": value, "tolerance": limit, "ok": value <= limit})
    return report
