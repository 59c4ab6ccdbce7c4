"""TensorRT engines in a bundle: where they live, the build record's format, and whether they can run here.

``imagefolder-export trt`` writes ``BUNDLE/engines/<graph>.plan`` and ``BUNDLE/engines/build.json``
(TensorRT version, GPU, flags, profiles, sha256 of every plan and of the ONNX file it came from);
the TensorRT backend reads the record and refuses plans built for another TensorRT version, another
GPU or another export. Both sides import TensorRT through ``import_tensorrt``. No torch; tensorrt
is imported only when asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from imagefolder.core import gpu_stack
from imagefolder.errors import EngineError, MissingDependency

ENGINE_DIR = "engines"
BUILD_RECORD = "build.json"
BUILD_FORMAT = "imagefolder-engines"
BUILD_SCHEMA_VERSION = 1
TIMING_CACHE = "timing.cache"
REBUILD_HINT = "rebuild them on this machine with `imagefolder-export trt BUNDLE`"


class TensorRTUnavailable(MissingDependency):
    """``import tensorrt`` failed."""


class EngineMismatch(EngineError):
    """The engines were built for another TensorRT, GPU or bundle, or a plan file is damaged."""


def import_tensorrt():
    """Import tensorrt, or raise ``TensorRTUnavailable`` naming what installs it on this machine."""
    try:
        import tensorrt
    except ImportError as err:
        raise gpu_stack.missing("TensorRT", err, cls=TensorRTUnavailable) from err
    return tensorrt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def read_build_record(bundle_dir: Path) -> dict:
    """The parsed ``engines/build.json`` of a bundle; ``EngineMismatch`` if absent or not ours."""
    path = bundle_dir / ENGINE_DIR / BUILD_RECORD
    if not path.is_file():
        raise EngineMismatch(
            f"{bundle_dir} has no TensorRT engines ({path} is missing); build them with "
            f"`imagefolder-export trt {bundle_dir}`"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EngineMismatch(f"{path}: unreadable engine record ({err}); {REBUILD_HINT}") from err
    if not isinstance(record, dict) or record.get("format") != BUILD_FORMAT:
        raise EngineMismatch(f"{path}: not an imagefolder engine record; {REBUILD_HINT}")
    return record


def check_build_record(record: dict, trt_version: str, gpu: dict, manifest: dict) -> None:
    """Raise ``EngineMismatch`` unless the engines of ``record`` can run here, on this bundle.

    Plans are tied to the TensorRT version and the GPU unless built version- or hardware-compatible:
    version-compatible plans run on the same or a later major version; ``ampere_plus`` plans on any
    GPU of compute capability ≥ 8.0; ``same_cc`` plans on any GPU of the same compute capability.
    """
    flags = record.get("flags", {})
    built_trt, built_gpu = record.get("tensorrt_version"), record.get("gpu", {})
    where = f"built with TensorRT {built_trt} on {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')})"
    here = f"this is TensorRT {trt_version} on {gpu['name']} (sm {gpu['compute_capability']})"
    if flags.get("version_compat"):
        trt_ok = int(str(trt_version).split(".")[0]) >= int(str(built_trt).split(".")[0])
    else:
        trt_ok = built_trt == trt_version
    compat = flags.get("hardware_compat", "none")
    if compat == "ampere_plus":
        gpu_ok = float(gpu["compute_capability"]) >= 8.0
    elif compat == "same_cc":
        gpu_ok = gpu["compute_capability"] == built_gpu.get("compute_capability")
    else:
        gpu_ok = (gpu["name"], gpu["compute_capability"]) == (
            built_gpu.get("name"),
            built_gpu.get("compute_capability"),
        )
    if not (trt_ok and gpu_ok):
        raise EngineMismatch(f"the engines were {where}; {here}: {REBUILD_HINT}")
    files = manifest.get("files") or {}
    for graph, entry in record.get("graphs", {}).items():
        built_from, now = entry.get("onnx_sha256"), files.get(entry.get("onnx_file", ""), {}).get("sha256")
        if built_from and now and built_from != now:
            raise EngineMismatch(f"the {graph} engine was built from another {entry['onnx_file']}; {REBUILD_HINT}")
