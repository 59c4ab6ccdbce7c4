"""A Triton Inference Server model repository from a bundle: ONNX Runtime on CPUs or TensorRT engines on GPUs.

Layout (``prefix`` defaults to ``imagefolder``)::

    OUT/<prefix>_generate/config.pbtxt      backend "python", dynamic batching, KIND_CPU or KIND_GPU instances
    OUT/<prefix>_generate/1/model.py        one line: the model is ``imagefolder.runtime.triton_model``
    OUT/<prefix>_generate/1/bundle/         the bundle: manifest, graphs (and engines) (hard links where possible)

The model runs the whole generation inside one instance (``--backend ort``: ONNX Runtime sessions on the
CPUs; ``--backend trt``: ``TrtBackend`` sessions on a GPU, replaying a CUDA graph per generation), one
session per served batch size: no state crosses the Triton boundary, so the repository has no engine
models. It imports ``imagefolder.runtime``, which must be installed in the Python the Python backend runs
(docs/triton.md). A bundle the chosen backend cannot run is refused here, in one line, rather than at the
server's load.
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
from imagefolder.core.specs import ORT_CPU_DTYPES
from imagefolder.errors import BundleError, InputError
from imagefolder.io import folder_lock, staged_folder

log = logging.getLogger(__name__)

GENERATE = "generate"
BUNDLE_DIR = "bundle"  # inside the version folder
MAX_QUEUE_DELAY_US = 2000  # how long the dynamic batcher may hold a request to fill a preferred batch
BACKENDS = ("ort", "trt")
INSTANCE_KINDS = {"ort": "KIND_CPU", "trt": "KIND_GPU"}
ORT_BATCH_LIMIT = 8  # default ort sessions: every batch size up to this (or the bundle's batch_max)
MODEL_PY = """\
# Triton Python-backend model: imagefolder's generation on ONNX Runtime or TensorRT (written by imagefolder-export).
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
    model_name: str,
    manifest: dict,
    batches: list[int],
    max_batch_size: int,
    defaults: SamplingParams,
    backend: str = "trt",
    instances: int = 1,
) -> dict:
    """``config.pbtxt`` (as a dict) of the generation model.

    One row per image in every tensor (Triton's batch dimension): a request of n images sends
    ``class_labels`` (n, 1) and, optionally, per-image ``seed``, ``cfg``, ``top_k``, ``top_p`` (n, 1);
    the row of image i in its request is i (its uniforms are ``image_uniforms(seed_i, i)``); a conditioned
    request adds ``reference_indices`` (n, 2, P) and ``force_mask`` (n, P, 2) (both or neither). Parameters
    carry the backend, the bundle's place, the batch sizes to serve and the sampling defaults, as strings.
    ``instances`` instances of ``INSTANCE_KINDS[backend]`` (trt: per GPU).
    """
    gen, size = manifest["model"]["generator"], manifest["model"]["tokenizer"]["image_size"]
    positions = sum(pn * pn for pn in gen["scales"])
    parameters = {"backend": backend, "bundle": BUNDLE_DIR, "batches": ",".join(map(str, batches))}
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
        # trt: requests wait up to the delay to fill an engine batch; ort (any size runs at its own cost):
        # the batcher gathers whatever waits, up to max_batch_size. The model packs what it gets into sessions.
        "dynamic_batching": {
            "preferred_batch_size": batches if backend == "trt" else [],
            "max_queue_delay_microseconds": MAX_QUEUE_DELAY_US,
        },
        # Each instance owns its sessions: trt, `instances` per GPU; ort, `instances` sharing the CPUs.
        "instance_group": [{"kind": Enum(INSTANCE_KINDS[backend]), "count": instances}],
        "parameters": [{"key": key, "value": {"string_value": value}} for key, value in parameters.items()],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Repository


def _bundle_files(manifest: dict, record: dict | None) -> list[str]:
    """What the model reads: the manifest, every file it lists, and (trt) the build record and the plans."""
    if record is None:
        return [MANIFEST, *manifest["files"]]
    plans = [entry["file"] for entry in record["graphs"].values()]
    return [MANIFEST, *manifest["files"], f"{ENGINE_DIR}/{BUILD_RECORD}", *plans]


def _trt_batches(bundle_dir: Path, batches: list[int] | None) -> tuple[dict, list[int]]:
    """The build record and the batches to serve; refuses a bundle without engines or an unbuilt batch."""
    record = read_build_record(bundle_dir)
    built = sorted(record.get("batches", []))
    served = sorted(set(batches or built))
    unbuilt = [b for b in served if b not in built]
    if unbuilt:
        raise InputError(f"batches {unbuilt} have no engine profiles (built: {built}); rebuild with --batch")
    return record, served


def _ort_batches(bundle_dir: Path, batches: list[int] | None) -> list[int]:
    """The batches to serve on ONNX Runtime's CPU provider; refuses a bundle it cannot run."""
    dtype = load_bundle(bundle_dir, verify=False).dtype
    if dtype not in ORT_CPU_DTYPES:
        raise BundleError(
            f"{bundle_dir}: a {dtype} bundle does not run on ONNX Runtime's CPU provider "
            f"(it runs {', '.join(ORT_CPU_DTYPES)}); serve it with --backend trt or re-export with --dtype fp32"
        )
    bundle = load_bundle(bundle_dir)  # hashes and graph I/O: a damaged bundle is refused here, not at load
    served = sorted(set(batches or range(1, min(bundle.batch_max, ORT_BATCH_LIMIT) + 1)))
    if served[0] < 1 or served[-1] > bundle.batch_max:
        raise InputError(
            f"batches {served} must lie in [1, {bundle.batch_max}] (the bundle's batch_max); "
            "re-export with a larger --batch-max"
        )
    return served


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
    backend: str = "trt",
    instances: int = 1,
) -> Path:
    """Write a Triton model repository that serves a bundle with ONNX Runtime or its TensorRT engines.

    Args:
        bundle_dir: the bundle; for ``trt`` with ``engines/`` from ``imagefolder-export trt``.
        out_dir: the repository folder (created; a model of the same name is replaced in one step).
        batches: batch sizes to serve, one session each (default: trt, every batch the engines were built
            for; ort, every size up to the bundle's batch_max, at most 8).
        prefix: model name prefix.
        defaults: sampling settings for requests that leave them out (default: ``SamplingParams()``).
        max_batch_size: the most images Triton hands the model at once (requests and batches above the
            largest served batch are split by the model); default 8 × the largest served batch.
        backend: ``ort`` (``KIND_CPU`` instances) or ``trt`` (``KIND_GPU`` instances).
        instances: model instances (ort: they share the CPUs' threads; trt: per GPU).

    Returns:
        the repository folder ``out_dir``.
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: a Triton repository serves {' or '.join(BACKENDS)}")
    if instances < 1:
        raise InputError(f"instances must be ≥ 1, got {instances}")
    manifest = load_bundle(bundle_dir, verify=False).manifest
    if backend == "trt":
        record, batches = _trt_batches(bundle_dir, batches)
    else:
        record, batches = None, _ort_batches(bundle_dir, batches)
    max_batch_size = 8 * batches[-1] if max_batch_size is None else max_batch_size
    if max_batch_size < batches[-1]:
        raise InputError(f"max_batch_size {max_batch_size} is below the largest served batch {batches[-1]}")

    name = f"{prefix}_{GENERATE}"
    folder = out_dir / name
    config = generate_config(
        name, manifest, batches, max_batch_size, defaults or SamplingParams(), backend=backend, instances=instances
    )
    with folder_lock(folder), staged_folder(folder) as stage:
        for file in _bundle_files(manifest, record):
            _link_or_copy(bundle_dir / file, stage / "1" / BUNDLE_DIR / file)
        (stage / "1" / "model.py").write_text(MODEL_PY)
        (stage / "config.pbtxt").write_text(to_pbtxt(config))
    log.info("Triton repository %s: %s on %s (batches %s)", out_dir, name, backend, batches)
    return out_dir
