"""A Triton Inference Server model repository from a bundle with built TensorRT engines.

Layout (``prefix`` defaults to ``imagefolder``)::

    OUT/<prefix>_<graph>/config.pbtxt, 1/model.plan      platform "tensorrt_plan", one per graph
    OUT/<prefix>_generate/config.pbtxt, 1/model.py, 1/imagefolder.json
                                                          backend "python": the generation loop over
                                                          the engine models through BLS

Engine models take unbatched tensors (``max_batch_size: 0``; symbolic dims are -1) and list the
optimization profiles of the requested batches in their instance group, so Triton picks the fixed-
shape profile that fits each request. ``config.pbtxt`` files are written by ``to_pbtxt`` (protobuf
text format of Triton's ``ModelConfig``) and every file is written atomically. No torch, no tensorrt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from imagefolder.core.bundle import load_bundle
from imagefolder.core.engines import ENGINE_DIR, read_build_record
from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import EngineError, ExportError, InputError
from imagefolder.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

MODEL_PY = Path(__file__).with_name("triton_model.py")
GENERATE = "generate"

TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


class Enum(str):
    """A protobuf enum value: written bare (``TYPE_FP32``), not quoted."""


# ---------------------------------------------------------------------------------------------------------------------
# Protobuf text writer


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a protobuf scalar")


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format of a message given as a dict.

    Values: scalars (``Enum`` for enum values), dicts (sub-messages), lists of scalars (repeated
    fields, written ``[a, b]``), lists of dicts (repeated messages). A map field is a list of
    ``{"key": ..., "value": ...}`` entries, as in the text format.
    """
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"invalid field name {key!r}")
        if value is None:
            continue
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list | tuple):
            if all(isinstance(v, dict) for v in value) and value:
                for item in value:
                    lines.append(f"{pad}{key} {{\n{to_pbtxt(item, indent + 1)}{pad}}}")
            elif value:
                lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------------------------------------------------------------
# Model configs


def _tensor(t: dict, optional: bool = False) -> dict:
    dtype = TRITON_DTYPES.get(t["dtype"])
    if dtype is None:
        raise ExportError(f"tensor {t['name']}: dtype {t['dtype']} has no Triton type")
    out = {"name": t["name"], "data_type": Enum(dtype), "dims": [d if isinstance(d, int) else -1 for d in t["shape"]]}
    if optional:
        out["optional"] = True
    return out


def engine_config(model_name: str, graph_entry: dict, profiles: list[int]) -> dict:
    """``config.pbtxt`` (as a dict) of one TensorRT engine model."""
    return {
        "name": model_name,
        "platform": "tensorrt_plan",
        "max_batch_size": 0,
        "input": [_tensor(t) for t in graph_entry["inputs"]],
        "output": [_tensor(t) for t in graph_entry["outputs"]],
        "instance_group": [{"kind": Enum("KIND_GPU"), "count": 1, "profile": [str(p) for p in profiles]}],
    }


def generate_config(model_name: str, manifest: dict) -> dict:
    """``config.pbtxt`` (as a dict) of the Python-backend generation model."""
    model, size = manifest["model"], manifest["model"]["tokenizer"]["image_size"]
    nb = model["generator"]["num_branches"]
    positions = sum(pn * pn for pn in model["generator"]["scales"])
    return {
        "name": model_name,
        "backend": "python",
        "max_batch_size": 0,
        "input": [
            {"name": "class_labels", "data_type": Enum("TYPE_INT64"), "dims": [-1]},
            {"name": "seed", "data_type": Enum("TYPE_INT64"), "dims": [1], "optional": True},
            {"name": "cfg", "data_type": Enum("TYPE_FP32"), "dims": [1], "optional": True},
            {"name": "top_k", "data_type": Enum("TYPE_INT64"), "dims": [1], "optional": True},
            {"name": "top_p", "data_type": Enum("TYPE_FP32"), "dims": [1], "optional": True},
        ],
        "output": [
            {"name": "image", "data_type": Enum("TYPE_FP32"), "dims": [-1, 3, size, size]},
            {"name": "indices", "data_type": Enum("TYPE_INT32"), "dims": [-1, nb, positions]},
        ],
        # The loop itself is light host code; the engines it calls run on the GPU.
        "instance_group": [{"kind": Enum("KIND_CPU"), "count": 1}],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Repository


def export_triton_repository(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    batches: list[int] | None = None,
    prefix: str = "imagefolder",
    defaults: dict | None = None,
) -> Path:
    """Write a Triton model repository for a bundle whose engines are built.

    Args:
        bundle_dir: the bundle, with ``engines/`` from ``imagefolder-export trt``.
        out_dir: the repository folder (created; existing models of the same names are overwritten).
        batches: batch sizes to serve (default: every batch the engines were built for).
        prefix: model name prefix.
        defaults: sampling defaults of the generation model (cfg, top_k, top_p, seed).

    Returns:
        the repository folder ``out_dir`` (one subfolder per model).
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    manifest = load_bundle(bundle_dir, verify=False).manifest
    record = read_build_record(bundle_dir)
    built = sorted(record.get("batches", []))
    batches = sorted(set(batches or built))
    unbuilt = [b for b in batches if b not in built]
    if unbuilt:
        raise InputError(f"batches {unbuilt} have no engine profiles (built: {built}); rebuild with --batch")

    written: dict[str, Path] = {}
    names = {}
    for graph, manifest_entry in manifest["graphs"].items():
        entry = record["graphs"].get(graph)
        if entry is None:
            raise EngineError(f"no {graph} engine in {bundle_dir / ENGINE_DIR}; build it first")
        name = names[graph] = f"{prefix}_{graph}"
        profiles = [p["index"] for p in entry["profiles"] if p["batch"] in batches]
        folder = out_dir / name
        atomic_write_bytes(folder / "1" / "model.plan", (bundle_dir / entry["file"]).read_bytes())
        atomic_write_text(folder / "config.pbtxt", to_pbtxt(engine_config(name, manifest_entry, profiles)))
        written[name] = folder

    name = f"{prefix}_{GENERATE}"
    folder = out_dir / name
    gen = manifest["model"]["generator"]
    settings = {
        "models": names,
        "scales": list(gen["scales"]),
        "num_classes": gen["num_classes"],
        "num_branches": gen["num_branches"],
        "folded_dim": gen["code_dim"] * gen["num_branches"],
        "depth": gen["depth"],
        "heads": gen["heads"],
        "head_dim": gen["width"] // gen["heads"],
        "sampler_candidates": manifest["sampler_candidates"],
        "codebook_size": manifest["model"]["generator"]["codebook_size"],
        "state_dtype": manifest["state_dtype"],
        "batch_max": max(batches),
        "defaults": {**dataclasses.asdict(SamplingParams()), **(defaults or {})},
    }
    atomic_write_text(folder / "1" / "imagefolder.json", json.dumps(settings, indent=2) + "\n")
    atomic_write_bytes(folder / "1" / "model.py", MODEL_PY.read_bytes())
    atomic_write_text(folder / "config.pbtxt", to_pbtxt(generate_config(name, manifest)))
    written[name] = folder
    log.info("Triton repository %s: %s", out_dir, ", ".join(written))
    return out_dir
