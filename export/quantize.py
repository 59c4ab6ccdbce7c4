"""Weight-only quantization of exported ONNX graphs (``imagefolder-export onnx --weights int8|int4``).

A pass over one ONNX file that knows nothing about which graph it is: every 2-D float initializer of
at least ``MIN_ELEMENTS`` values whose consumers all read it as the weight (input B) of a MatMul, or
of a Gemm that is a plain product (alpha = beta = 1, A not transposed), becomes int8 or int4 values
plus scales in (K, N) layout, and a ``DequantizeLinear`` node recreates the float weight under its
old name. Those Gemms become MatMul (+ Add of their C), which computes the same: ONNX Runtime fuses
DequantizeLinear → MatMul into one quantized kernel (``MatMulNBits``) but dequantizes a Gemm's weight
anew on every call. The graph's inputs and outputs stay exactly as they were (``quantize_graph``
checks them after rewriting). Activations are not quantized.

Formats (symmetric, no zero point: TensorRT's parser accepts only all-zero zero points):

- ``int8``: one scale per output channel (DequantizeLinear ``axis`` 1 of the (K, N) weight).
  Opset ≥ 13; fp16/bf16 scales (fp16/bf16 bundles) need DequantizeLinear-19, so opset ≥ 19.
- ``int4``: one scale per block of ``INT4_BLOCK`` values along K (``axis`` 0, ``block_size``; scales
  (K / block, N)). INT4 and ``block_size`` exist from DequantizeLinear-21: opset ≥ 21. TensorRT's
  parser reads INT4 from 10.0 and infers the block from the scales' shape.

Each scale is max |w| / qmax over its channel or block, shrunk by the ratio in ``CLIP_RATIOS`` that
gives the smallest squared error (clipping a few outliers buys resolution for all other values).
Zero channels get the smallest normal scale of their dtype: TensorRT refuses non-positive scales.

Which graphs: ``QUANTIZED_GRAPHS``, the generator's. ``ar_step`` runs once per scale and reads all
its weights each time for a few positions, so its time is weight reads; ``ar_prefill`` holds the
AdaLN weights (a third of the generator). The tokenizer graphs run once per image and are left in
float: the encoder ends in a nearest-code choice that weight noise flips, and the decoder's errors
are pixels. The sampler has no weights and the fold's are small codebooks and 3×3 φ convs.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from imagefolder.core.bundle import onnx_io
from imagefolder.core.specs import DTYPES, WEIGHT_SCHEMES
from imagefolder.errors import ExportError, InputError
from imagefolder.export.onnx_files import graph_opset, load_graph, save_graph

log = logging.getLogger(__name__)

QUANTIZED_GRAPHS = frozenset({"ar_prefill", "ar_step"})
MIN_ELEMENTS = 16384  # 128 × 128: smaller matrices (embeddings of the folded input) save nothing worth an error
INT4_BLOCK = 64  # divides every reduction width of the presets (tiny: 128, 512; d17: 1088 = 17·64, 4352)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
BITS = {"int8": 8, "int4": 4}

PER_AXIS_OPSET = 13  # DequantizeLinear-13: the axis attribute (per-channel scales)
LOW_PRECISION_SCALE_OPSET = 19  # DequantizeLinear-19: float16 / bfloat16 scales
INT4_OPSET = 21  # DequantizeLinear-21: INT4 values and block_size
DEFAULT_OPSET = 17  # what every TensorRT 10.x parses (JetPack 6 ships 10.3)


# ---------------------------------------------------------------------------------------------
# Which opset a scheme needs
# ---------------------------------------------------------------------------------------------


def minimum_opset(weights: str, dtype: str) -> int:
    """The lowest opset that can express ``weights`` in a ``dtype`` bundle."""
    if weights == "int4":
        return INT4_OPSET
    if weights == "int8":
        return PER_AXIS_OPSET if dtype == "fp32" else LOW_PRECISION_SCALE_OPSET
    return 1


def default_opset(weights: str, dtype: str) -> int:
    """The opset an export uses when none is asked for: 17, or the minimum the weights need."""
    return max(DEFAULT_OPSET, minimum_opset(weights, dtype))


def check_weights(weights: str, dtype: str, opset: int) -> None:
    """Refuse a weight scheme the bundle's dtype and opset cannot express.

    Raises:
        InputError: naming the opset (and the TensorRT version that parses it) the combination needs.
    """
    if weights not in WEIGHT_SCHEMES:
        raise InputError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_SCHEMES)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    need = minimum_opset(weights, dtype)
    if opset >= need:
        return
    if weights == "int4":
        raise InputError(
            f"int4 weights need opset ≥ {INT4_OPSET} (INT4 and block_size exist from DequantizeLinear-21), got "
            f"--opset {opset}; TensorRT parses INT4 weights from 10.0 on but documents opsets 9-20 until 10.x and "
            f"9-24 in 11.x; use --opset {INT4_OPSET}, or --weights int8 to stay at opset {opset}"
        )
    raise InputError(
        f"int8 weights in a {dtype} bundle need opset ≥ {need} ({dtype} scales exist from DequantizeLinear-19), got "
        f"--opset {opset}; use --opset {need} (every TensorRT 10.x parses it)"
    )


# ---------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------


def quantize_weight(weight: np.ndarray, bits: int, block: int | None, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest quantization of a (K, N) weight per output channel or per block of K.

    Args:
        weight: the float weight (K, N): K the reduction, N the output channels.
        bits: 8 or 4; values lie in [-(2^(bits-1) - 1), 2^(bits-1) - 1].
        block: values of K per scale; None for one scale per output channel (all of K).
        scale_dtype: numpy dtype of the scales (the bundle's float type).
    Returns:
        (q, scale): q int8 (K, N); scale (N,) per channel, else (K / block, N) (the layout of
        DequantizeLinear's blocked scales along axis 0).
    """
    qmax = 2 ** (bits - 1) - 1
    w = weight.astype(np.float32)
    k, n = w.shape
    size = block or k
    groups = w.reshape(k // size, size, n)  # (G, block, N)
    amax = np.abs(groups).max(axis=1)  # (G, N)
    floor = float(np.finfo(scale_dtype).tiny)

    def rounded(ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = np.maximum(amax * ratio / qmax, floor).astype(scale_dtype).astype(np.float32)  # as stored
        q = np.clip(np.rint(groups / scale[:, None]), -qmax, qmax)
        return q, scale, np.square(q * scale[:, None] - groups).sum(axis=1)  # error (G, N)

    best_q, best_scale, best_err = rounded(CLIP_RATIOS[0])
    for ratio in CLIP_RATIOS[1:]:
        q, scale, err = rounded(ratio)
        better = err < best_err
        best_q = np.where(better[:, None], q, best_q)
        best_scale, best_err = np.where(better, scale, best_scale), np.minimum(err, best_err)
    scale = best_scale[0] if block is None else best_scale
    return best_q.reshape(k, n).astype(np.int8), scale.astype(scale_dtype)


# ---------------------------------------------------------------------------------------------
# The graph pass
# ---------------------------------------------------------------------------------------------


def _weight_layout(node, index: int) -> str | None:
    """How ``node`` reads its input ``index`` as a weight this pass can quantize: "KN" (MatMul's B, a
    plain Gemm's B), "NK" (a plain Gemm's B with transB), None (no such weight)."""
    from onnx import helper

    if index != 1:
        return None
    if node.op_type == "MatMul":
        return "KN"
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0):
            return "NK" if attrs.get("transB", 0) else "KN"
    return None


def _as_matmul(node, taken: set[str]) -> list:
    """A plain Gemm as MatMul, plus an Add of its C when it has one: same inputs, same output."""
    from onnx import helper

    a, b, *c = node.input
    if not c or not c[0]:
        return [helper.make_node("MatMul", [a, b], list(node.output), name=node.name)]
    product = _fresh(f"{node.output[0]}_product", taken)
    return [
        helper.make_node("MatMul", [a, b], [product], name=node.name),
        helper.make_node("Add", [product, c[0]], list(node.output), name=f"{node.name}_bias" if node.name else ""),
    ]


def _stored_bytes(tensor) -> int:
    """Bytes a weight occupies in the file (INT4 packs two values per byte)."""
    from onnx import numpy_helper

    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return int(numpy_helper.to_array(tensor).nbytes)


def weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of all initializers of an ONNX file, as stored."""
    import onnx

    return sum(_stored_bytes(t) for t in onnx.load(os.fspath(path), load_external_data=False).graph.initializer)


def quantize_graph(path: str | os.PathLike, weights: str, min_elements: int = MIN_ELEMENTS) -> dict:
    """Quantize the MatMul/Gemm weights of the ONNX file at ``path`` in place.

    Args:
        weights: ``int8`` (per output channel) or ``int4`` (blocks of ``INT4_BLOCK``; the file must
            be at opset ≥ 21).
        min_elements: smaller weights stay float.
    Returns:
        The manifest's record: scheme, block size, bytes before and after, and how many weights were
        quantized and how many eligible ones stayed float (int4: K not a multiple of the block).
    Raises:
        ExportError: the file's opset cannot express ``weights``, or its I/O changed (a bug).
    """
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    bits, block = BITS[weights], (INT4_BLOCK if weights == "int4" else None)
    model = load_graph(path)
    graph, opset = model.graph, graph_opset(model)
    if opset < minimum_opset(weights, "fp32"):
        raise ExportError(f"{path.name}: opset {opset} cannot hold {weights} weights")
    io_before = onnx_io(path)
    bytes_before = sum(_stored_bytes(t) for t in graph.initializer)

    readers = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers[name].append(_weight_layout(node, index))
    taken = {t.name for t in graph.initializer} | {out for node in graph.node for out in node.output}
    graph_inputs = {value.name for value in graph.input}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

    kept, dequantize, replaced = [], [], {}
    for tensor in graph.initializer:
        layouts = set(readers.get(tensor.name, [None]))
        eligible = (
            tensor.data_type in float_types
            and len(tensor.dims) == 2
            and int(np.prod(tensor.dims)) >= min_elements
            and tensor.name not in graph_inputs
            and len(layouts) == 1
            and None not in layouts
        )
        if not eligible:
            continue
        value = numpy_helper.to_array(tensor)
        value = value.T if layouts == {"NK"} else value  # (K, N), the layout every reader gets as a MatMul
        if block is not None and value.shape[0] % block:
            kept.append(tensor.name)
            continue
        if value.dtype != np.float32 and opset < LOW_PRECISION_SCALE_OPSET:
            raise ExportError(f"{path.name}: opset {opset} has no {value.dtype} scales for {tensor.name}")
        q, scale = quantize_weight(value, bits, block, value.dtype)
        q_name, s_name = _fresh(f"{tensor.name}_quantized", taken), _fresh(f"{tensor.name}_scale", taken)
        if bits == 4:
            import ml_dtypes

            q = q.astype(ml_dtypes.int4)
        replaced[tensor.name] = [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
        attrs = {"axis": 1} if block is None else {"axis": 0, "block_size": block}
        dequantize.append(helper.make_node("DequantizeLinear", [q_name, s_name], [tensor.name], **attrs))

    initializers = []
    for tensor in graph.initializer:
        initializers.extend(replaced.get(tensor.name, [tensor]))
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    nodes = list(dequantize)  # a DequantizeLinear comes before the nodes that read its output
    for node in graph.node:
        quantized_gemm = node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in replaced
        nodes.extend(_as_matmul(node, taken) if quantized_gemm else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    save_graph(model, path)

    onnx.checker.check_model(str(path))
    if onnx_io(path) != io_before:
        raise ExportError(f"{path.name}: weight quantization changed the graph's inputs or outputs")
    if kept:
        log.info("%s: %d weights stay float (K not a multiple of %s): %s", path.name, len(kept), block, kept)
    return {
        "scheme": weights,
        "block_size": block,
        "bytes": sum(_stored_bytes(t) for t in graph.initializer),
        "float_bytes": bytes_before,
        "quantized": len(replaced),
        "kept_float": len(kept),
    }


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... whichever no tensor of the graph uses yet (then taken)."""
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate
