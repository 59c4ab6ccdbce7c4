"""The bundle's weights: stored once, in one file, whatever graph reads them.

Several graphs read the same tensors: the tokenizer's codebooks and φ convolutions serve the
encoder, the decoder and the fold graph. ``pack_weights`` moves every initializer of at least
``PACK_MIN_BYTES`` out of the graph files into ``weights.bin``, one copy per distinct tensor
(dtype, shape and bytes), 64-byte aligned, and points each graph at its offset (ONNX external
data). ONNX Runtime and TensorRT's ``parse_from_file`` resolve the file next to the graph. Smaller
initializers (shape vectors, scalars, a TopK's K) stay in the graphs, where the operator checks read
them. ``weight_report`` measures what is stored: each graph's weight bytes, the bytes on disk, and
the bytes stored more than once (zero after packing). Needs onnx, no torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

WEIGHTS_FILE = "weights.bin"
PACK_MIN_BYTES = 64  # smaller initializers are shape vectors and scalars, not weights
ALIGNMENT = 64


def _payload(tensor) -> bytes:
    """A tensor's bytes as ONNX stores them (raw data: INT4 two values per byte, little-endian)."""
    from onnx import numpy_helper

    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()  # typed fields: standard dtypes only


def _external(tensor) -> dict[str, str]:
    return {item.key: item.value for item in tensor.external_data}


def pack_weights(graphs: list[Path], folder: Path) -> Path:
    """Move the weights of ``graphs`` (self-contained ONNX files in ``folder``) into ``folder/weights.bin``.

    Tensors with equal dtype, shape and bytes are stored once. Rewrites each graph in place; returns
    the weights file.
    """
    import onnx

    target = folder / WEIGHTS_FILE
    stored: dict[tuple, tuple[int, int]] = {}  # (dtype, dims, sha256) → (offset, length)
    with open(target, "wb") as out:
        for path in graphs:
            model = onnx.load(os.fspath(path))
            for tensor in model.graph.initializer:
                data = _payload(tensor)
                if len(data) < PACK_MIN_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())
                if key not in stored:
                    out.write(b"\0" * (-out.tell() % ALIGNMENT))
                    stored[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = stored[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for name, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    tensor.external_data.add(key=name, value=value)
            onnx.save(model, os.fspath(path))
    return target


def weight_report(folder: Path, graph_files: dict[str, str]) -> dict:
    """What the graphs' weights (initializers of ≥ ``PACK_MIN_BYTES``) cost on disk.

    Returns ``{"graphs": {name: bytes read}, "stored": bytes on disk, "duplicated": bytes of
    tensors whose content is stored more than once}``.
    """
    import onnx

    per_graph: dict[str, int] = {}
    places: dict[tuple, tuple[int, set]] = {}  # content → (bytes, the distinct places it is stored)
    for name, file in graph_files.items():
        model = onnx.load(os.fspath(folder / file), load_external_data=False)
        total = 0
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entry = _external(tensor)
                length = int(entry["length"])
                with open(folder / entry["location"], "rb") as f:
                    f.seek(int(entry.get("offset", 0)))
                    data = f.read(length)
                place: tuple = (entry["location"], int(entry.get("offset", 0)))
            else:
                data = _payload(tensor)
                place = (file, tensor.name)
            if len(data) < PACK_MIN_BYTES:
                continue
            total += len(data)
            key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())
            size, where = places.setdefault(key, (len(data), set()))
            where.add(place)
        per_graph[name] = total
    stored = sum(size * len(where) for size, where in places.values())
    duplicated = sum(size * (len(where) - 1) for size, where in places.values())
    return {"graphs": per_graph, "stored": stored, "duplicated": duplicated}
