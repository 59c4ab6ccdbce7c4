"""Small file helpers shared by the bundle writers (ONNX export, TensorRT build, Triton export).

No torch here: the TensorRT side runs on targets without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imagefolder.io import atomic_write, sha256_file


def file_digest(path: str | os.PathLike) -> dict:
    """The manifest entry of one file: sha256 and size."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a part."""
    with atomic_write(Path(path)) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
