"""Integer arithmetic for ONNX Runtime's CPU provider (``imagefolder-export onnx --weights int8 --compute MODE``).

A pass over one ONNX file that ``export/quantize.py`` already gave int8 per-output-channel weights: every
``DequantizeLinear → MatMul`` pair becomes a product in integers, so the GEMM runs on MLAS's u8×s8 kernels
(AVX2 / AVX-512 VNNI) instead of dequantizing the weight and multiplying in float. The weights stay as
``quantize.py`` stored them (int8 values, one float scale per output channel, no zero point); the
activations are quantized at run time, in the graph:

- ``int8`` (standard ONNX operators): one scale per row of the activation (per position and CFG row),
  ``s = max |a| / 127``; ``a / s`` rounded is shifted by 128 into uint8 with the zero point 128, so the
  product is ``MatMulInteger(a_u8, w_s8, 128)``, cast to float and multiplied by ``s`` and the weight
  scales. Per-row scales keep one outlier position from coarsening every other position's grid.
- ``int8-tensor`` (ONNX Runtime's contrib ``DynamicQuantizeMatMul``): one kernel quantizes the whole
  activation with one scale and zero point (uint8, asymmetric) and multiplies. Fewer passes over the
  activation, a coarser grid.

Which provider can run the result: ONNX Runtime's CPU provider only. TensorRT's parser has no
MatMulInteger or contrib operators, so the bundle's manifest names the provider (``PROVIDER``) and the
TensorRT build and backend refuse it. ``check_compute`` asks the installed ONNX Runtime for each mode's
kernels before an export starts. Needs onnx and onnxruntime, not torch.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagefolder.core.bundle import onnx_io
from imagefolder.core.specs import COMPUTE_MODES
from imagefolder.errors import ExportError, InputError
from imagefolder.export.onnx_files import graph_opset, load_graph, save_graph

PROVIDER = "CPUExecutionProvider"  # the one execution provider with kernels for every mode below
CONTRIB = "com.microsoft"
ROW_LEVELS = 127.0  # symmetric int8 grid of the per-row mode: values -127..127, shifted by 128 into uint8
REDUCE_AXES_AS_INPUT_OPSET = 18  # ReduceMax-18 takes its axes as an input, earlier ones as an attribute


@dataclass(frozen=True)
class IntegerKernel:
    """The operator a compute mode multiplies with, and where ONNX Runtime registers it."""

    op_type: str
    domain: str = ""


KERNELS = {"int8": IntegerKernel("MatMulInteger"), "int8-tensor": IntegerKernel("DynamicQuantizeMatMul", CONTRIB)}


def check_compute(compute: str, weights: str, dtype: str, kernels: dict[str, IntegerKernel] | None = None) -> None:
    """Refuse a compute mode this export cannot produce or the installed ONNX Runtime cannot run.

    Raises:
        InputError: an unknown mode, weights other than int8, a dtype other than fp32, or a mode whose kernel
            the installed ONNX Runtime's CPU provider lacks (the message names the operator and the version).
    """
    if compute not in COMPUTE_MODES:
        raise InputError(f"unknown compute mode {compute!r}; choose one of {', '.join(COMPUTE_MODES)}")
    if compute == "float":
        return
    if weights != "int8":
        raise InputError(f"--compute {compute} multiplies int8 weights; add --weights int8 (got --weights {weights})")
    if dtype != "fp32":
        raise InputError(f"--compute {compute} is for fp32 bundles (ONNX Runtime's CPU provider); got --dtype {dtype}")
    kernel = (kernels or KERNELS)[compute]
    if not has_kernel(kernel):
        import onnxruntime

        where = f" ({kernel.domain})" if kernel.domain else ""
        raise InputError(
            f"--compute {compute} needs ONNX Runtime's {kernel.op_type}{where} kernel on the CPU provider, which "
            f"onnxruntime {onnxruntime.__version__} lacks; upgrade onnxruntime or choose another --compute"
        )


def has_kernel(kernel: IntegerKernel) -> bool:
    """Whether the installed ONNX Runtime's CPU provider runs ``kernel`` on uint8 activations and int8 weights."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    if kernel.domain:
        scale = numpy_helper.from_array(np.ones(3, np.float32), "s")
        node = helper.make_node(kernel.op_type, ["a", "w", "s"], ["y"], domain=kernel.domain)
        inputs, inits, a_type, y_type = ["a"], [weight, scale], TensorProto.FLOAT, TensorProto.FLOAT
    else:
        node = helper.make_node(kernel.op_type, ["a", "w"], ["y"])
        inputs, inits, a_type, y_type = ["a"], [weight], TensorProto.UINT8, TensorProto.INT32
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info(name, a_type, [2, 4]) for name in inputs],
        [helper.make_tensor_value_info("y", y_type, [2, 3])],
        inits,
    )
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(kernel.domain, 1)] if kernel.domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=[PROVIDER])
    except Exception:  # noqa: BLE001 - ONNX Runtime raises its own classes for a missing kernel or operator
        return False
    return True


def integer_matmuls(path: str | os.PathLike, compute: str) -> dict:
    """Rewrite every int8-weight ``DequantizeLinear → MatMul`` of the fp32 ONNX file at ``path`` into ``compute``.

    Returns:
        The manifest's record: the mode, how many products became integer, and the operator that computes them.
    Raises:
        ExportError: the file has no int8 per-channel weights to multiply, or its I/O changed (a bug).
    """
    import onnx

    path = Path(path)
    model = load_graph(path)
    graph = model.graph
    io_before = onnx_io(path)
    stored = {t.name: t for t in graph.initializer}
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    weights = {}  # dequantized weight name → (int8 values name, scale name)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or stored.get(node.input[0]) is None:
            continue
        if stored[node.input[0]].data_type != onnx.TensorProto.INT8 or len(stored[node.input[0]].dims) != 2:
            continue
        if any(a.name == "block_size" for a in node.attribute) or len(node.input) > 2:
            continue
        if all(r.op_type == "MatMul" and r.input[1] == node.output[0] for r in readers[node.output[0]]):
            weights[node.output[0]] = (node.input[0], node.input[1])
    if not weights:
        raise ExportError(f"{path.name}: no int8 per-channel weights to multiply in integers")

    builder = _Builder(graph, graph_opset(model))
    nodes = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in weights:
            continue
        if node.op_type == "MatMul" and node.input[1] in weights:
            values, scale = weights[node.input[1]]
            if compute == "int8":
                nodes += builder.row_product(node, values, scale)
            else:
                nodes += builder.tensor_product(node, values, scale)
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(builder.constants)
    if compute == "int8-tensor" and not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
    save_graph(model, path)
    onnx.checker.check_model(str(path))
    if onnx_io(path) != io_before:
        raise ExportError(f"{path.name}: integer compute changed the graph's inputs or outputs")
    return {"compute": compute, "integer_products": len(weights), "operator": KERNELS[compute].op_type}


class _Builder:
    """Makes the nodes of the integer products, with fresh names, and the constants they share."""

    def __init__(self, graph, opset: int):
        self.taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        self.taken |= {v.name for v in graph.input}
        self.opset = opset
        self.constants: list = []
        self._shared: dict[str, str] = {}
        self._rows: dict[str, tuple[str, str]] = {}  # activation → (uint8 values, per-row scales), made once

    def fresh(self, name: str) -> str:
        candidate, i = name, 0
        while candidate in self.taken:
            i += 1
            candidate = f"{name}_{i}"
        self.taken.add(candidate)
        return candidate

    def constant(self, key: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if key not in self._shared:
            self._shared[key] = self.fresh(key)
            self.constants.append(numpy_helper.from_array(value, self._shared[key]))
        return self._shared[key]

    def _quantized_rows(self, activation: str) -> tuple[list, str, str]:
        """Nodes that quantize ``activation`` per row (last axis) into uint8 around 128, once per activation."""
        from onnx import helper

        if activation in self._rows:
            return [], *self._rows[activation]
        base = activation.replace("/", "_").strip("_") or "a"
        magnitude, peak, raw, scale = (self.fresh(f"{base}_{s}") for s in ("abs", "peak", "raw_scale", "row_scale"))
        ratio, rounded, shifted, quantized = (self.fresh(f"{base}_{s}") for s in ("ratio", "round", "shift", "u8"))
        if self.opset >= REDUCE_AXES_AS_INPUT_OPSET:
            axes = self.constant("integer_last_axis", np.array([-1], np.int64))
            reduce = helper.make_node("ReduceMax", [magnitude, axes], [peak], keepdims=1)
        else:
            reduce = helper.make_node("ReduceMax", [magnitude], [peak], axes=[-1], keepdims=1)
        tiny = self.constant("integer_tiny", np.array(np.finfo(np.float32).tiny, np.float32))
        nodes = [
            helper.make_node("Abs", [activation], [magnitude]),
            reduce,
            helper.make_node("Mul", [peak, self.constant("integer_step", np.array(1 / ROW_LEVELS, np.float32))], [raw]),
            helper.make_node("Max", [raw, tiny], [scale]),  # an all-zero row keeps a positive scale
            helper.make_node("Div", [activation, scale], [ratio]),
            helper.make_node("Round", [ratio], [rounded]),
            helper.make_node("Add", [rounded, self.constant("integer_offset", np.array(128, np.float32))], [shifted]),
            helper.make_node("Cast", [shifted], [quantized], to=2),  # UINT8: 1..255
        ]
        self._rows[activation] = (quantized, scale)
        return nodes, quantized, scale

    def row_product(self, matmul, values: str, weight_scale: str) -> list:
        """``matmul`` (A · dequantized W) as MatMulInteger on per-row uint8 A, rescaled to float."""
        from onnx import helper

        nodes, quantized, row_scale = self._quantized_rows(matmul.input[0])
        out = matmul.output[0]
        product, as_float, by_row = (self.fresh(f"{out}_{s}") for s in ("int32", "float", "rows"))
        zero = self.constant("integer_zero_point", np.array(128, np.uint8))
        return nodes + [
            helper.make_node("MatMulInteger", [quantized, values, zero], [product], name=matmul.name),
            helper.make_node("Cast", [product], [as_float], to=1),  # FLOAT
            helper.make_node("Mul", [as_float, row_scale], [by_row]),
            helper.make_node("Mul", [by_row, weight_scale], [out]),
        ]

    def tensor_product(self, matmul, values: str, weight_scale: str) -> list:
        """``matmul`` as one DynamicQuantizeMatMul (per-tensor uint8 activation, per-channel int8 weight)."""
        from onnx import helper

        return [
            helper.make_node(
                "DynamicQuantizeMatMul",
                [matmul.input[0], values, weight_scale],
                list(matmul.output),
                name=matmul.name,
                domain=CONTRIB,
            )
        ]
