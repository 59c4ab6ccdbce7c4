"""One d17 linear layer (1088 → 4352, bias) in ONNX Runtime's MatMul and Gemm forms against torch.addmm.

The question is whether the graph form of the linear layers (a 3-D MatMul + Add, as the exporter
writes them, or a 2-D Gemm with the weight as stored or transposed) or the GEMM library explains
the middle steps' distance from the floor. The weight (19 MB) stays in the last-level cache across
calls here, so this measures the kernels' arithmetic at each row count M = 2 × positions, not the
DRAM stream of a whole step. Both libraries get two threads (ORT: spinning off, as the backend runs).
Rounds interleave the four contenders; the best of three rounds of 20 calls is reported.

    python bench/matmul_kernels.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

K, N = 1088, 4352
ROWS = (2, 8, 18, 32, 72, 242)  # 2 × the positions of d17's scales 1, 2, 3, 4, 6, 9


def session(form: str, rows: int, weight: np.ndarray, bias: np.ndarray) -> tuple[ort.InferenceSession, list[int]]:
    """An ORT session of one linear layer in ``form`` (matmul3d, gemm, gemm_transposed) and its input shape."""
    if form == "matmul3d":
        shape = [2, rows // 2, K]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
        stored = weight
    else:
        shape = [rows, K]
        transposed = form == "gemm_transposed"
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=int(transposed))]
        stored = np.ascontiguousarray(weight.T) if transposed else weight
    graph = helper.make_graph(
        nodes,
        form,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options), shape


def seconds_per_call(call: Callable[[], object], calls: int = 20) -> float:
    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((K, N), dtype=np.float32) * 0.02
    bias = rng.standard_normal(N).astype(np.float32)
    forms = ("matmul3d", "gemm", "gemm_transposed")
    print(f"GFLOP/s of (M × {K}) · ({K} × {N}) + bias, best of 3 rounds × 20 calls")
    print("| M | " + " | ".join(f"ORT {f}" for f in forms) + " | torch.addmm |")
    print("| ---: |" + " ---: |" * (len(forms) + 1))
    for rows in ROWS:
        contenders: dict[str, Callable[[], object]] = {}
        for form in forms:
            sess, shape = session(form, rows, weight, bias)
            x = rng.standard_normal(shape, dtype=np.float32)
            contenders[form] = partial(sess.run, None, {"x": x})
        xt, wt, bt = torch.randn(rows, K), torch.from_numpy(weight), torch.from_numpy(bias)
        contenders["torch"] = partial(torch.addmm, bt, xt, wt)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(3):
            for name, call in contenders.items():
                times[name].append(seconds_per_call(call))
        best = {name: min(t) for name, t in times.items()}
        gflop = 2 * rows * K * N / 1e9
        print(f"| {rows} | " + " | ".join(f"{gflop / t:.0f}" for t in best.values()) + " |")


if __name__ == "__main__":
    main()
