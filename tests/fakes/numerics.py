"""How the fake TensorRT's kernels round: ONNX graph rewrites that ONNX Runtime's CPU provider then runs.

A real engine does not compute what ONNX Runtime computes. Two differences matter to this project and
are modelled here, each as a rewrite of the plan's ONNX graph before the fake runs it:

- **TF32** (``tf32_products``): with ``BuilderFlag.TF32`` (on by default), TensorRT may run fp32
  matrix products and convolutions on tensor cores that read both operands with a 10-bit mantissa
  (NVIDIA, "TF32 ... has the same 10-bit mantissa as half-precision"), accumulating in fp32. Both
  inputs of every ``MatMul``, ``Gemm`` and ``Conv`` are rounded to nearest at 11 significant bits
  (Veltkamp's split: ``t = x · (2¹³ + 1)``, rounded ``x = t − (t − x)``, exact in IEEE fp32 arithmetic),
  weights once at load, activations by three inserted nodes. Accumulation order is not modelled.
- **bf16** (``bf16_as_float32``): ONNX Runtime's CPU provider has no bf16 kernels, so a bf16 graph
  runs in fp32 with every bf16 value it holds kept: bf16 weights and constants become the fp32
  numbers they are, and every ``Cast`` to bf16 is followed by a ``Cast`` back to fp32, so the
  rounding the graph asks for happens where it asks for it; the arithmetic between casts is fp32
  (a real bf16 kernel rounds more often, so this is the gentler model).

fp16 needs no rewrite: ONNX Runtime runs the fp16 graph itself, in fp16 where it has fp16 kernels.
TF32 is opt-in (``installed(tf32_rounding=True)``): most tests want TensorRT's results to equal ONNX
Runtime's exactly, so that any difference is a bug of the product, not rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TF32_SPLIT = np.float32(2**13 + 1)  # 24 − 11 = 13 bits dropped: 10 explicit mantissa bits remain
PRODUCTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1)}


def round_tf32(values: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest TF32 value (10-bit mantissa), in fp32."""
    x = np.asarray(values, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        t = x * TF32_SPLIT
        rounded = t - (t - x)
    return np.where(np.isfinite(rounded), rounded, x).astype(np.float32)


def tf32_products(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose fp32 matrix products and convolutions read TF32-rounded operands."""
    model = _copy(model)
    graph = model.graph
    floats = _float_tensors(model)
    initializers = {init.name: init for init in graph.initializer}
    split = "tf32_split"
    graph.initializer.append(numpy_helper.from_array(np.array(TF32_SPLIT, np.float32), split))
    rounded: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        for index in PRODUCTS.get(node.op_type, ()):
            if index >= len(node.input) or node.input[index] not in floats:
                continue
            name = node.input[index]
            if name in initializers:
                init = initializers[name]
                init.CopyFrom(numpy_helper.from_array(round_tf32(numpy_helper.to_array(init)), name))
                continue
            if name not in rounded:
                t, diff, out = (f"{name}/tf32_{part}" for part in ("t", "diff", "rounded"))
                nodes += [
                    helper.make_node("Mul", [name, split], [t]),
                    helper.make_node("Sub", [t, name], [diff]),
                    helper.make_node("Sub", [t, diff], [out]),
                ]
                rounded[name] = out
            node.input[index] = rounded[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def bf16_as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a bf16 ``model`` that ONNX Runtime's CPU provider runs: fp32 arithmetic, bf16 rounding kept."""
    model = _copy(model)
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.BFLOAT16:
            init.CopyFrom(numpy_helper.from_array(_bf16_values(init), init.name))
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.BFLOAT16:
                attribute.t.CopyFrom(numpy_helper.from_array(_bf16_values(attribute.t), attribute.t.name))
        nodes.append(node)
        if node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == TensorProto.BFLOAT16:
            out = node.output[0]
            node.output[0] = f"{out}/bf16"
            nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


def holds_bf16(model: onnx.ModelProto) -> bool:
    """Does ``model`` compute in bf16 anywhere (weights, constants or casts)?"""
    if any(init.data_type == TensorProto.BFLOAT16 for init in model.graph.initializer):
        return True
    return any(
        node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == TensorProto.BFLOAT16
        for node in model.graph.node
    )


def _bf16_values(tensor: onnx.TensorProto) -> np.ndarray:
    """The fp32 numbers a bf16 tensor holds (bf16 is the top half of an fp32's bits)."""
    if tensor.raw_data:
        bits = np.frombuffer(tensor.raw_data, np.uint16)
    else:  # stored one uint16 per int32_data entry
        bits = np.asarray(tensor.int32_data, np.uint32).astype(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(tensor.dims))


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the fp32 tensors of ``model`` (shape inference fills in the intermediate ones)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    values = [*graph.value_info, *graph.input, *graph.output]
    names = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return names | {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def runnable(onnx_bytes: bytes, tf32: bool = False) -> bytes:
    """The graph the fake's kernels run for a plan's ONNX bytes: bf16 emulated, TF32 products if ``tf32``."""
    model = onnx.load_from_string(onnx_bytes)
    if holds_bf16(model):
        return bf16_as_float32(model).SerializeToString()
    if tf32:
        return tf32_products(model).SerializeToString()
    return onnx_bytes
