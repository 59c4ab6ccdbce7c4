"""Comparing a graph's outputs with a reference, and the report of ``imagefolder-export check``.

One routine (``compare_outputs``) serves every comparison the project makes: the export's parity
check (ONNX Runtime against fp32 PyTorch), ``imagefolder-export check --backend ort`` (the same, at
every scale) and ``--backend trt`` (TensorRT engines against ONNX Runtime). Tolerances depend on
what is compared with what, the bundle dtype, and the output's role (``core.specs``):

- floating outputs: relative error ``max |actual − expected| / max |expected|``;
- code indices (role ``indices``): the fraction that differs, since a nearest-code choice flips
  where two codes are nearly equally close;
- sampled tokens (role ``tokens``): the fraction that differs; the sampler is a deterministic
  function of its inputs, so only rounding at a near-tie of two scores can flip one.

A graph with quantized weights (``core.specs.WEIGHT_SCHEMES``) is allowed the larger of its dtype's
relative error and its weight format's (``WEIGHT_TOLERANCES``), whatever the reference.

No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from imagefolder.core.specs import GraphSpec

# reference → bundle dtype → {"relative": floats, "indices": code choices, "tokens": sampled tokens}
TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    # ONNX Runtime (CPU) against the fp32 PyTorch model the graphs were exported from.
    "torch": {
        "fp32": {"relative": 1e-4, "indices": 0.005, "tokens": 0.0},
        "fp16": {"relative": 2e-2, "indices": 0.1, "tokens": 0.0},
        "bf16": {"relative": 8e-2, "indices": 0.2, "tokens": 0.0},
    },
    # TensorRT engines against ONNX Runtime on the same bundle (TF32 and fp16 kernels differ in the last bits).
    # "tf32": an fp32 bundle's engines built with TF32 (TensorRT's default), whose matrix products read
    # operands with fp16's 10-bit mantissa: nearest-code choices flip as often as fp16's do. On the fakes'
    # TF32 model (tests/fakes/numerics.py) at the official width, 5.8 % of the encoder's indices flipped
    # (random weights, noise images), floats stayed within 7.9e-4 (tests/test_trt_numerics.py).
    "ort": {
        "fp32": {"relative": 1e-3, "indices": 0.01, "tokens": 1e-3},
        "tf32": {"relative": 1e-3, "indices": 0.1, "tokens": 1e-3},
        "fp16": {"relative": 3e-2, "indices": 0.1, "tokens": 1e-3},
        "bf16": {"relative": 1e-1, "indices": 0.2, "tokens": 1e-3},
    },
}
# Relative error allowed to graphs with quantized weights (export/quantize.py), against either reference.
# Measured worst case over every scale of ar_prefill/ar_step (ONNX Runtime CPU against fp32 PyTorch):
# int8 0.016, int4 0.19 (default model); 0.012 / 0.11 (d17 architecture, random weights) — about 1/100
# and 1/10 of the largest logit, docs/benchmarks.md. A wrong scale axis or block gives errors near 1.
WEIGHT_TOLERANCES: dict[str, float] = {"int8": 0.05, "int4": 0.35}


def compare_outputs(
    spec: GraphSpec,
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    dtype: str,
    reference: str,
    weights: str = "fp",
) -> dict[str, dict]:
    """Per output of ``spec``: the metric, its value, the tolerance and whether it holds.

    Args:
        actual, expected: output name → array (the graph under test, the reference).
        dtype: the bundle dtype (fp32, fp16, bf16), or tf32 for fp32 engines built with TF32 (reference "ort").
        reference: what ``expected`` comes from, a key of ``TOLERANCES`` ("torch" or "ort").
        weights: how the graph's weights are stored: "fp", or a key of ``WEIGHT_TOLERANCES``.
    """
    limits = TOLERANCES[reference][dtype]
    if weights != "fp":
        limits = {**limits, "relative": max(limits["relative"], WEIGHT_TOLERANCES[weights])}
    report = {}
    for tensor in spec.outputs:
        got, want = np.asarray(actual[tensor.name]), np.asarray(expected[tensor.name])
        if got.shape != want.shape:
            report[tensor.name] = {
                "metric": "shape",
                "value": float("inf"),
                "tolerance": 0.0,
                "ok": False,
                "detail": f"{got.shape} != {want.shape}",
            }
        elif np.issubdtype(want.dtype, np.integer):
            limit = limits["tokens" if tensor.role == "tokens" else "indices"]
            mismatch = float((got != want).mean()) if want.size else 0.0
            report[tensor.name] = {"metric": "mismatch", "value": mismatch, "tolerance": limit, "ok": mismatch <= limit}
        else:
            diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0
            scale = float(np.abs(want.astype(np.float64)).max()) if want.size else 0.0
            relative = diff / (scale or 1.0)
            limit = limits["relative"]
            report[tensor.name] = {
                "metric": "max_rel",
                "value": relative,
                "max_abs": diff,
                "tolerance": limit,
                "ok": bool(np.isfinite(relative)) and relative <= limit,
            }
    return report


class OperatorSummary(Protocol):
    """What the report needs of an operator-support report (``export.opcheck.OperatorReport``)."""

    @property
    def ok(self) -> bool: ...

    def summary(self) -> str: ...


@dataclass
class CheckReport:
    """Rows of graph, scale, output, metric, value, tolerance, ok; each graph's operator support; notes.

    ``operators`` come from TensorRT's own parser where TensorRT is installed and from the static
    listing otherwise; each summary says which. ``notes`` are printed after the table (e.g. what
    ``--debug`` saved for a failure and the command that bisects it).
    """

    rows: list[dict] = field(default_factory=list)
    operators: Mapping[str, OperatorSummary] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, graph: str, scale: int | None, comparison: dict[str, dict]) -> None:
        """Add the rows of one ``compare_outputs`` result."""
        for output, entry in comparison.items():
            self.rows.append(
                {
                    "graph": graph,
                    "scale": "-" if scale is None else scale,
                    "output": output,
                    "metric": entry["metric"],
                    "value": entry["value"],
                    "tolerance": entry["tolerance"],
                    "ok": entry["ok"],
                }
            )

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows) and all(op.ok for op in self.operators.values())

    def table(self) -> str:
        lines = [f"{'graph':<11} {'scale':>5}  {'output':<12} {'metric':<9} {'value':>10} {'tolerance':>10}  ok"]
        for r in self.rows:
            lines.append(
                f"{r['graph']:<11} {r['scale']:>5}  {r['output']:<12} {r['metric']:<9} "
                f"{r['value']:>10.3e} {r['tolerance']:>10.0e}  {'yes' if r['ok'] else 'NO'}"
            )
        if self.operators:
            lines += ["", "TensorRT ONNX operator support:"]
            for name, report in self.operators.items():
                lines.append(f"  {name:<11} " + report.summary().replace("\n", "\n" + " " * 14))
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)
