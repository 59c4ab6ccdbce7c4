"""Rewriting an exported ONNX file in place: load it, save it back atomically, raise its opset.

The passes that run after torch's export (``raise_opset`` here, the weight quantization of
``export/quantize.py``) load a graph with its weights, change it, and save it with ``save_graph``:
atomically, weights inline under protobuf's 2 GB limit and in one ``<graph>.onnx.data`` file above
it, and without the external files the new version no longer reads. Needs onnx, not torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from imagefolder.core.bundle import external_data_files
from imagefolder.errors import ExportError
from imagefolder.io import atomic_write

TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx's TorchScript exporter writes opsets up to 20
# ONNX 1.16 brought opset 21 and IR version 10 (the first with INT4); an opset needs at least its IR version.
MIN_IR_VERSION = {21: 10, 22: 10, 23: 11, 24: 11}
PROTOBUF_LIMIT = 2**31 - 1


def graph_opset(model) -> int:
    """The default-domain opset an ONNX ``ModelProto`` imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_graph(path: str | os.PathLike):
    """The ``ModelProto`` at ``path`` with its weights (external ones included)."""
    import onnx

    return onnx.load(os.fspath(path))


def save_graph(model, path: str | os.PathLike) -> None:
    """Replace the ONNX file at ``path`` by ``model`` atomically (weights external only above 2 GB)."""
    import onnx

    path = Path(path)
    before = external_data_files(path) if path.exists() else []
    with atomic_write(path) as tmp:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.save(model, str(tmp))
        else:
            onnx.save(model, str(tmp), save_as_external_data=True, location=f"{path.name}.data")
    for stale in set(before) - set(external_data_files(path)):
        (path.parent / stale).unlink(missing_ok=True)


def raise_opset(path: str | os.PathLike, opset: int) -> None:
    """Convert the graph at ``path`` to ``opset`` in place (no-op when it is there already).

    ``onnx.version_converter`` rewrites every node whose definition changed on the way (ReduceL2's
    ``axes`` attribute becomes an input at opset 18, for instance), so the graph computes the same.

    Raises:
        ExportError: the converter cannot express the graph at ``opset``.
    """
    import onnx
    from onnx import version_converter

    model = load_graph(path)
    if graph_opset(model) >= opset:
        return
    try:
        converted = version_converter.convert_version(model, opset)
        converted.ir_version = max(converted.ir_version, MIN_IR_VERSION.get(opset, 0))
        save_graph(converted, path)
        onnx.checker.check_model(os.fspath(path))
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as err:
        raise ExportError(f"{path}: cannot convert the graph to opset {opset}: {err}") from err
