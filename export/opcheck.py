"""Is every node of an ONNX graph one that TensorRT's ONNX parser supports?

The list is onnx-tensorrt's operator matrix for TensorRT 10.x (``docs/operators.md``), restricted
to what TensorRT 10.3 parses, the version JetPack 6 ships. Besides the operator names, a few
documented restrictions are checked on the graph itself:
TopK needs a constant K below 3840, CumSum a constant axis, Resize no cubic mode or antialias.
DequantizeLinear (quantized weights, ``export/quantize.py``) follows the checks of onnx-tensorrt's
importer (``QuantDequantLinearHelper``) and TensorRT 10.x's Dequantize layer: constant scales, all
positive; zero points absent or all zero; INT8 or INT4 values; per-axis scales as long as their
axis; block scales (same rank as the values) for 2-D INT4 only, one blocked dimension dividing
evenly; INT4 with an even last dimension.

Opset 21 passes with a note: TensorRT 10.x documents opsets 9-20, but INT4 weights exist in ONNX
only from opset 21, whose changes over 20 add types to existing operators and blocks to Q/DQ,
except GroupNormalization (new scale/bias layout, which TensorRT 10.7 still parses as opset 18;
NVIDIA/TensorRT#4336), which is flagged. TensorRT's parser refuses no model for a newer opset (no
upper bound in onnx-tensorrt's ``ModelImporter``; the issue above parsed opset-21 graphs).
A bundle made for one execution provider (integer compute, ``export/integer.py``) is not a TensorRT
bundle: its report names that provider and lists the integer operators instead of judging them against
TensorRT's parser (the export ran every graph on that provider in its parity check).
Imports onnx only (no torch, no TensorRT), so it runs anywhere.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from imagefolder.core.sampler import TRT_TOPK_LIMIT

TRT_MAX_OPSET = 20  # TensorRT 10.x parses opsets 9-20 (10.14+ go further; 10.3 does not)
TRT_MIN_OPSET = 9
INT4_OPSET = 21  # the opset of INT4 weights: accepted with a note (see the module docstring)
QUANTIZED_TYPES = {3: "INT8", 22: "INT4"}  # TensorProto types TensorRT dequantizes (FP8/FP4 unused here)
TENSORRT_TARGET = "static list of TensorRT 10.3's parser"
# Operators that multiply in integers (export/integer.py): ONNX Runtime CPU kernels, none of them TensorRT's.
INTEGER_OPERATORS = ("MatMulInteger", "DynamicQuantizeMatMul")

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
    notes: list[str] = field(default_factory=list)  # what passes but is worth knowing; never fails the check
    target: str = TENSORRT_TARGET  # what the graph was checked for

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
            "notes": self.notes,
            "target": self.target,
        }

    def summary(self) -> str:
        status = "ok" if self.ok else "NOT SUPPORTED"
        nodes = f"opset {self.opset}, {sum(self.counts.values())} nodes, {len(self.counts)} operator types"
        lines = [f"{self.target}: {nodes}: {status}"]
        lines += [f"  unsupported operator: {op}" for op in self.unsupported]
        lines += [f"  {problem}" for problem in self.problems]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


CONSTANT_READ_LIMIT = 1 << 22  # external initializers up to 4 MiB are read (scales, zero points); weights are not


def _constants(graph, folder: str) -> dict:
    """Values of the graph's constants (initializers and Constant nodes) a rule may need, by name.

    Initializers in an external file (``weights.bin``) are read from ``folder`` when small: the
    rules look at scalars, K of a TopK, the scales and zero points of a DequantizeLinear.
    """
    import onnx
    from onnx import numpy_helper

    values = {}
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            values[init.name] = numpy_helper.to_array(init)
            continue
        length = next((int(e.value) for e in init.external_data if e.key == "length"), CONSTANT_READ_LIMIT + 1)
        if length <= CONSTANT_READ_LIMIT:
            values[init.name] = numpy_helper.to_array(init, base_dir=folder)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def check_operators(path: str | os.PathLike, provider: str = "any") -> OperatorReport:
    """Check an ONNX file against TensorRT 10.3's parser support (operators, opset, restrictions).

    ``provider``: the bundle's (``Bundle.provider``); a graph made for one ONNX Runtime provider is listed,
    with its integer operators, and not judged against TensorRT.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = model.graph
    counts = Counter(node.op_type for node in graph.node)
    if provider != "any":
        integer = [f"{op} ×{counts[op]}" for op in INTEGER_OPERATORS if op in counts]
        return OperatorReport(
            opset=opset,
            counts=dict(sorted(counts.items())),
            notes=[f"integer products: {', '.join(integer)}"] if integer else [],
            target=f"ONNX Runtime's {provider} (integer compute; not a TensorRT graph)",
        )
    report = OperatorReport(opset=opset, counts=dict(sorted(counts.items())))
    report.unsupported = sorted(op for op in counts if op not in SUPPORTED)
    if opset == INT4_OPSET:
        report.notes.append(
            f"opset {opset} is beyond TensorRT 10.3's documented {TRT_MIN_OPSET}-{TRT_MAX_OPSET} (INT4 weights need "
            "it); its operators are those of opset 20 with more types, which the parser reads (not verified on a GPU)"
        )
        if "GroupNormalization" in counts:
            report.problems.append("GroupNormalization at opset 21: TensorRT 10.x parses its opset-18 definition")
    elif not TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET:
        report.problems.append(f"opset {opset} outside TensorRT 10.3's range {TRT_MIN_OPSET}-{TRT_MAX_OPSET}")
    constants = _constants(graph, os.path.dirname(os.fspath(path)))
    types = {init.name: init.data_type for init in graph.initializer}
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
        elif node.op_type == "DequantizeLinear":
            report.problems += [f"{where}: {p}" for p in _dequantize_problems(node, constants, types)]
    if any(types.get(n.input[0]) == 3 for n in graph.node if n.op_type == "DequantizeLinear"):
        report.notes.append(
            "INT8 weights without quantized activations: TensorRT 10.x documents weight-only quantization for INT4; "
            "check in the engine whether the weights stay INT8 (they may be dequantized when the engine is built)"
        )
    if any(t.type.tensor_type.elem_type == 11 for t in list(graph.input) + list(graph.output)):
        report.problems.append("a graph input or output is float64")
    return report


def _dequantize_problems(node, constants: dict, types: dict[str, int]) -> list[str]:
    """What TensorRT's ONNX importer and Dequantize layer refuse in one DequantizeLinear node."""
    import onnx

    problems = []
    scale = constants.get(node.input[1])
    if scale is None:
        return ["scale is not a constant"]
    if not (scale.astype("float64") > 0).all():
        problems.append("scale has values ≤ 0 (TensorRT needs positive scales)")
    if len(node.input) > 2 and node.input[2]:
        zero_point = constants.get(node.input[2])
        if zero_point is None or zero_point.astype("int64").any():
            problems.append("zero point is not a constant of zeros (TensorRT quantizes symmetrically)")
    kind = types.get(node.input[0])
    values = constants.get(node.input[0])
    if kind is None or values is None:
        return problems  # activations: TensorRT types them; weight-only graphs never dequantize one
    if kind not in QUANTIZED_TYPES:
        problems.append(f"values are {onnx.TensorProto.DataType.Name(kind)}, not INT8 or INT4")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    shape, rank = values.shape, values.ndim
    axis = attrs.get("axis", 1) % max(rank, 1)
    if kind == 22 and rank and shape[-1] % 2:
        problems.append(f"INT4 values {list(shape)} have an odd last dimension")
    if scale.ndim == 1 and scale.size > 1 and scale.size != shape[axis]:
        problems.append(f"{scale.size} scales for {shape[axis]} channels along axis {axis}")
    elif scale.ndim > 1:
        blocked = [d for d in range(rank) if scale.shape[d] != shape[d]]
        if kind != 22 or rank != 2:
            problems.append("block scales: TensorRT 10.x block-quantizes 2-D INT4 weights only")
        if scale.ndim != rank or len(blocked) != 1 or any(shape[d] % scale.shape[d] for d in blocked):
            problems.append(f"scales {list(scale.shape)} do not split {list(shape)} into even blocks along one axis")
    return problems


def operator_reports(bundle) -> dict[str, OperatorReport]:
    """The operator-support report of every graph of a loaded ``core.bundle.Bundle``."""
    return {name: check_operators(bundle.graph_path(name), bundle.provider) for name in bundle.specs}
