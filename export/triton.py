"""A Triton Inference Server model repository from a bundle with built TensorRT engines.

Layout (``prefix`` defaults to ``imagefolder``)::

    OUT/<prefix>_generate/config.pbtxt      backend "python", dynamic batching, one instance per GPU
    OUT/<prefix>_generate/1/model.py        one line: the model is ``imagefolder.runtime.triton_model``
    OUT/<prefix>_generate/1/bundle/         the bundle: manifest, graphs, engines (hard links where possible)

The model runs the whole generation on the device (``TrtBackend`` sessions, one per served batch size,
replaying a CUDA graph per generation): no state crosses the Triton boundary, so the repository has
no engine models. It imports ``imagefolder.runtime``, which must be installed in the Triton image
(``pip install 'imagefolder[gpu]'`` into the Python the Python backend runs; docs/triton.md).
Each input has the batch dimension Triton's dynamic batcher concatenates along (one row per image);
``config.pbtxt`` is written by ``to_pbtxt`` (protobuf text format of Triton's ``ModelConfig``) and the
model folder replaces an old one in one step. No torch, no tensorrt.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path

from imagefolder.core.bundle import MANIFEST, load_bundle
from imagefolder.core.engines import BUILD_RECORD, ENGINE_DIR, read_build_record
from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import InputError
from imagefolder.io import folder_lock, staged_folder

log = logging.getLogger(__name__)

GENERATE = "generate"
BUNDLE_DIR = "bundle"  # inside the version folder
MAX_QUEUE_DELAY_US = 2000  # how long the dynamic batcher may hold a request to fill a preferred batch
MODEL_PY = """\
# Triton Python-backend model: imagefolder's device-resident TensorRT generation (written by imagefolder-export).
from imagefolder.runtime.triton_model import TritonPythonModel  # noqa: F401
"""


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
# Model config


def _input(name: str, data_type: str, optional: bool = False, dims: list[int] | None = None) -> dict:
    return {
        "name": name,
        "data_type": Enum(data_type),
        "dims": dims or [1],
        **({"optional": True} if optional else {}),
    }


def generate_config(
    model_name: str, manifest: dict, batches: list[int], max_batch_size: int, defaults: SamplingParams
) -> dict:
    """``config.pbtxt`` (as a dict) of the generation model.

    One row per image in every tensor (Triton's batch dimension): a request of n images sends
    ``class_labels`` (n, 1) and, optionally, per-image ``seed``, ``cfg``, ``top_k``, ``top_p`` (n, 1);
    the row of image i in its request is i (its uniforms are ``image_uniforms(seed_i, i)``); a conditioned
    request adds ``reference_indices`` (n, 2, P) and ``force_mask`` (n, P, 2) (both or neither). Parameters
    carry the bundle's place, the batch sizes to serve and the sampling defaults, as strings.
    """
    gen, size = manifest["model"]["generator"], manifest["model"]["tokenizer"]["image_size"]
    positions = sum(pn * pn for pn in gen["scales"])
    parameters = {"bundle": BUNDLE_DIR, "batches": ",".join(map(str, batches))}
    parameters.update({k: str(v) for k, v in dataclasses.asdict(defaults).items()})
    return {
        "name": model_name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": [
            _input("class_labels", "TYPE_INT64"),
            _input("seed", "TYPE_INT64", optional=True),
            _input("cfg", "TYPE_FP32", optional=True),
            _input("top_k", "TYPE_INT64", optional=True),
            _input("top_p", "TYPE_FP32", optional=True),
            _input("reference_indices", "TYPE_INT32", optional=True, dims=[gen["num_branches"], positions]),
            _input("force_mask", "TYPE_BOOL", optional=True, dims=[positions, gen["num_branches"]]),
        ],
        "output": [
            {"name": "image", "data_type": Enum("TYPE_FP32"), "dims": [3, size, size]},
            {"name": "indices", "data_type": Enum("TYPE_INT32"), "dims": [gen["num_branches"], positions]},
        ],
        # Requests wait up to the delay to fill an engine batch; the model packs what it gets into sessions.
        "dynamic_batching": {"preferred_batch_size": batches, "max_queue_delay_microseconds": MAX_QUEUE_DELAY_US},
        # The model owns its GPU work: one instance per GPU, each with its own engines and sessions.
        "instance_group": [{"kind": Enum("KIND_GPU"), "count": 1}],
        "parameters": [{"key": key, "value": {"string_value": value}} for key, value in parameters.items()],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Repository


def _bundle_files(manifest: dict, record: dict) -> list[str]:
    """What the model reads: the manifest, every file it lists, the build record and the plans."""
    plans = [entry["file"] for entry in record["graphs"].values()]
    return [MANIFEST, *manifest["files"], f"{ENGINE_DIR}/{BUILD_RECORD}", *plans]


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # bundle files are replaced by rename, never rewritten: a link stays valid
    except OSError:
        shutil.copy2(source, target)


def export_triton_repository(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    batches: list[int] | None = None,
    prefix: str = "imagefolder",
    defaults: SamplingParams | None = None,
    max_batch_size: int | None = None,
) -> Path:
    """Write a Triton model repository that serves a bundle's TensorRT engines.

    Args:
        bundle_dir: the bundle, with ``engines/`` from ``imagefolder-export trt``.
        out_dir: the repository folder (created; a model of the same name is replaced in one step).
        batches: engine batch sizes to serve, one session each (default: every batch the engines were built for).
        prefix: model name prefix.
        defaults: sampling settings for requests that leave them out (default: ``SamplingParams()``).
        max_batch_size: the most images Triton hands the model at once (requests and batches above the
            largest engine batch are split by the model); default 8 × the largest served batch.

    Returns:
        the repository folder ``out_dir``.
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    manifest = load_bundle(bundle_dir, verify=False).manifest
    record = read_build_record(bundle_dir)
    built = sorted(record.get("batches", []))
    batches = sorted(set(batches or built))
    unbuilt = [b for b in batches if b not in built]
    if unbuilt:
        raise InputError(f"batches {unbuilt} have no engine profiles (built: {built}); rebuild with --batch")
    max_batch_size = 8 * batches[-1] if max_batch_size is None else max_batch_size
    if max_batch_size < batches[-1]:
        raise InputError(f"max_batch_size {max_batch_size} is below the largest served batch {batches[-1]}")

    name = f"{prefix}_{GENERATE}"
    folder = out_dir / name
    config = generate_config(name, manifest, batches, max_batch_size, defaults or SamplingParams())
    with folder_lock(folder), staged_folder(folder) as stage:
        for file in _bundle_files(manifest, record):
            _link_or_copy(bundle_dir / file, stage / "1" / BUNDLE_DIR / file)
        (stage / "1" / "model.py").write_text(MODEL_PY)
        (stage / "config.pbtxt").write_text(to_pbtxt(config))
    log.info("Triton repository %s: %s (batches %s)", out_dir, name, batches)
    return out_dir
