"""Is every node of an ONNX graph one that TensorRT's ONNX parser supports?

The list is onnx-tensorrt's operator matrix for TensorRT 10.x (``docs/operators.md``), restricted
to what TensorRT 10.3 parses, the version JetPack 6 ships. Besides the operator names, a few
documented restrictions are checked on the graph itself:
TopK needs a constant K below 3840, CumSum a constant axis, Resize no cubic mode or antialias.
Imports onnx only (no torch, no TensorRT), so it runs anywhere.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from imagefolder.core.sampler import TRT_TOPK_LIMIT

TRT_MAX_OPSET = 20  # TensorRT 10.x parses opsets 9-20 (10.14+ go further; 10.3 does not)
TRT_MIN_OPSET = 9

SUPPORTED = frozenset(
    {
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "AffineGrid",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "AveragePool",
        "BatchNormalization",
        "Bernoulli",
        "BlackmanWindow",
        "Cast",
        "CastLike",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DFT",
        "DeformConv",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "GRU",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "GroupNormalization",
        "HammingWindow",
        "HannWindow",
        "HardSigmoid",
        "HardSwish",
        "Hardmax",
        "Identity",
        "If",
        "ImageScaler",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
        "LRN",
        "LSTM",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LpNormalization",
        "LpPool",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "MeanVarianceNormalization",
        "Min",
        "Mish",
        "Mod",
        "Mul",
        "Neg",
        "NonMaxSuppression",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "PRelu",
        "Pad",
        "ParametricSoftplus",
        "Pow",
        "QuantizeLinear",
        "RNN",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "ReverseSequence",
        "RoiAlign",
        "Round",
        "STFT",
        "ScaledTanh",
        "Scan",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    }
)
# Nodes that make a graph data-dependent in shape: parseable, but not capturable in a CUDA graph.
DATA_DEPENDENT = frozenset({"NonZero", "NonMaxSuppression"})


@dataclass
class OperatorReport:
    opset: int
    counts: dict[str, int]
    unsupported: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unsupported and not self.problems

    def to_dict(self) -> dict:
        return {
            "opset": self.opset,
            "ok": self.ok,
            "counts": self.counts,
            "unsupported": self.unsupported,
            "problems": self.problems,
        }

    def summary(self) -> str:
        status = "ok" if self.ok else "NOT SUPPORTED"
        nodes = f"opset {self.opset}, {sum(self.counts.values())} nodes, {len(self.counts)} operator types"
        lines = [f"static list of TensorRT 10.3's parser: {nodes}: {status}"]
        lines += [f"  unsupported operator: {op}" for op in self.unsupported]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


def _constants(graph) -> dict:
    import onnx
    from onnx import numpy_helper

    inline = [init for init in graph.initializer if init.data_location != onnx.TensorProto.EXTERNAL]
    values = {init.name: numpy_helper.to_array(init) for init in inline}  # weights live in weights.bin
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def check_operators(path: str | os.PathLike) -> OperatorReport:
    """Check an ONNX file against TensorRT 10.3's parser support (operators, opset, restrictions)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = model.graph
    counts = Counter(node.op_type for node in graph.node)
    report = OperatorReport(opset=opset, counts=dict(sorted(counts.items())))
    report.unsupported = sorted(op for op in counts if op not in SUPPORTED)
    if not TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET:
        report.problems.append(f"opset {opset} outside TensorRT 10.3's range {TRT_MIN_OPSET}-{TRT_MAX_OPSET}")
    constants = _constants(graph)
    for node in graph.node:
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.op_type == "TopK":
            k = constants.get(node.input[1])
            if k is None:
                report.problems.append(f"{where}: K is not a constant")
            elif int(k.reshape(-1)[0]) >= TRT_TOPK_LIMIT:
                report.problems.append(f"{where}: K={int(k.reshape(-1)[0])} ≥ {TRT_TOPK_LIMIT}")
        elif node.op_type == "CumSum" and node.input[1] not in constants:
            report.problems.append(f"{where}: axis is not a constant")
        elif node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("mode", b"nearest") == b"cubic" or attrs.get("antialias", 0):
                report.problems.append(f"{where}: cubic or antialiased Resize is not supported")
        elif node.op_type in DATA_DEPENDENT:
            report.problems.append(f"{where}: data-dependent output shape (no CUDA-graph capture)")
    if any(t.type.tensor_type.elem_type == 11 for t in list(graph.input) + list(graph.output)):
        report.problems.append("a graph input or output is float64")
    return report


def operator_reports(bundle) -> dict[str, OperatorReport]:
    """The operator-support report of every graph of a loaded ``core.bundle.Bundle``."""
    return {name: check_operators(bundle.graph_path(name)) for name in bundle.specs}
