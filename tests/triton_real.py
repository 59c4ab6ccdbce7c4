"""Helpers of the real-server tests (tests/test_triton_server.py, tests/test_triton_faults.py).

The server is the ``tritonserver`` of the ``nvidia-pytriton`` wheel (``make test`` installs it). Where the
wheel has a build (Linux x86-64, glibc ≥ 2.35, Python 3.8-3.13) a missing server fails the tests; elsewhere
they skip, naming why. Every answer is compared, row by row, with ONNX Runtime on the same bundle in this
process: what the image would get alone (``image_uniforms(seed, row)``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import MissingDependency
from imagefolder.runtime.triton_server import TritonServer, find_triton, unsupported_platform

MODEL = "imagefolder_generate"
SCRIPTS = Path(sys.executable).parent
KINDS = {"class_labels": ("INT64", np.int64), "seed": ("INT64", np.int64), "cfg": ("FP32", np.float32)}
KINDS |= {"top_k": ("INT64", np.int64), "top_p": ("FP32", np.float32)}
KINDS |= {"reference_indices": ("INT32", np.int32), "force_mask": ("BOOL", np.bool_)}  # schema 5: per image
READY_DEADLINE_S = 180  # a model load on a busy 2-core machine


def require_server() -> None:
    """Skip where the wheel has no build for this platform; fail where it should be installed and is not."""
    reason = unsupported_platform()
    if reason is not None:
        pytest.skip(reason)
    try:
        find_triton()
    except MissingDependency as err:
        pytest.fail(f"{err}; `make test` installs it, and the real-server tests must run on this platform")


def run(command: list[str], cwd: Path) -> None:
    """One of our console scripts, as a user types it, in ``cwd``."""
    result = subprocess.run(
        [str(SCRIPTS / command[0]), *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (shlex.join(command), result.stderr[-2000:])


def export_default_repository(work: Path, extra: list[str] | tuple = ()) -> Path:
    """``work/bundle`` (the default model) and ``work/repo`` served on ONNX Runtime; returns the repository."""
    run(["imagefolder-export", "onnx", "--out", "bundle"], work)
    run(["imagefolder-export", "triton", "bundle", "--out", "repo", "--backend", "ort", *extra], work)
    return work / "repo"


def inputs_of(client_module, labels, **settings) -> list:
    """A request of ``tritonclient.http`` or ``.grpc``: one row per image; a scalar setting is repeated."""
    tensors = {"class_labels": labels, **settings}
    out = []
    for name, values in tensors.items():
        datatype, dtype = KINDS[name]
        if np.ndim(values) == 3:  # (n, ...) tensors of conditioned generation, as given
            array = np.ascontiguousarray(values, dtype=dtype)
        else:
            array = np.asarray(np.broadcast_to(values, (len(labels),)), dtype=dtype).reshape(-1, 1)
        tensor = client_module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


class Reference:
    """What one image gets alone on ONNX Runtime in this process: ``get(label, row, **settings)``."""

    def __init__(self, bundle: Path):
        from imagefolder.runtime.backends.ort import OrtBackend

        self.backend = OrtBackend(bundle)
        self.session = self.backend.session(1)
        self.lock = threading.Lock()
        self.cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, label: int, row: int, **settings) -> tuple[np.ndarray, np.ndarray]:
        from imagefolder.runtime.loop import ImageRequest, run_batch

        key = (label, row, tuple(sorted(settings.items())))
        with self.lock:
            if key not in self.cache:
                params = SamplingParams(**settings)
                result = run_batch(self.session, self.backend.scales, [ImageRequest(label, params, row)])
                self.cache[key] = (result.images[0], result.indices[0])
            return self.cache[key]

    def check(self, image: np.ndarray, indices: np.ndarray, labels, **settings) -> None:
        """Every row of an answer against what it gets alone: never empty, never another row's tokens."""
        assert image.shape[0] == indices.shape[0] == len(labels) and image.size and indices.size
        for row, label in enumerate(labels):
            mine = {k: (v[row] if isinstance(v, list) else v) for k, v in settings.items()}
            want_image, want_indices = self.get(int(label), row, **mine)
            np.testing.assert_array_equal(indices[row], want_indices, err_msg=f"row {row}")
            np.testing.assert_allclose(image[row], want_image, atol=1e-5, err_msg=f"row {row}")


def statistics(server: TritonServer, model: str = MODEL) -> tuple[int, int]:
    """(inference_count, execution_count) of the model, from Triton's statistics extension."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"]
    return sum(s["inference_count"] for s in stats), sum(s["execution_count"] for s in stats)


def repository_post(server: TritonServer, path: str) -> tuple[int, str]:
    """POST to the repository extension (``load``, ``unload``, ``index``): (status, body)."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository{path}", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_for(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"{what} within {deadline_s} s"
        time.sleep(0.1)
