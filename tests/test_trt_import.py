"""The TensorRT side imports and fails cleanly where TensorRT, cuda-python and a GPU are absent."""

from __future__ import annotations

import enum
import subprocess
import sys

import pytest

from imagefolder.configs import tiny
from imagefolder.core import cuda
from imagefolder.core.engines import EngineMismatch, TensorRTUnavailable, check_build_record
from imagefolder.export import trt_build
from imagefolder.export.trt_build import build_engines
from imagefolder.io import atomic_write_bytes
from imagefolder.runtime.backends.trt import TrtBackend
from tests.trt_helpers import fake_build_record, make_manifest, write_fake_bundle

MODULES = (
    "imagefolder.export.trt_build",
    "imagefolder.export.triton",
    "imagefolder.core.cuda",
    "imagefolder.runtime.backends.trt",
)


def test_modules_import_without_tensorrt_torch_or_cuda():
    code = (
        "import sys; sys.modules['tensorrt'] = None; sys.modules['cuda'] = None\n"
        f"import {', '.join(MODULES)}\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# What installs TensorRT on this kind of machine (tests/test_gpu_stack.py checks each kind).
INSTALL_HINT = r"pip install .*\[gpu-cu1[23]\]'|sudo apt install python3-libnvinfer"


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError, installed or not


def test_build_engines_needs_tensorrt(no_tensorrt, tmp_path):
    write_fake_bundle(tmp_path, make_manifest(tiny()))
    with pytest.raises(TensorRTUnavailable, match=INSTALL_HINT):
        build_engines(tmp_path, batches=[1])
    assert isinstance(TensorRTUnavailable("x", "gpu"), ImportError)


def test_trt_backend_needs_tensorrt(no_tensorrt, tmp_path):
    write_fake_bundle(tmp_path, make_manifest(tiny()))
    with pytest.raises(TensorRTUnavailable, match=INSTALL_HINT):
        TrtBackend(tmp_path)


def test_cuda_needs_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setattr(cuda, "_cudart", None)
    with pytest.raises(cuda.CudaUnavailable, match="cuda-python"):
        cuda.DeviceBuffer(16)


class FakeError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def test_check_unwraps_and_raises():
    assert cuda.check((FakeError.cudaSuccess,)) is None
    assert cuda.check((FakeError.cudaSuccess, 42)) == 42
    assert cuda.check((FakeError.cudaSuccess, 1, 2)) == (1, 2)
    assert cuda.check(FakeError.cudaSuccess) is None
    with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
        cuda.check((FakeError.cudaErrorMemoryAllocation, None))


GPU = {"name": "Orin", "compute_capability": "8.7"}


def test_build_record_must_match_tensorrt_and_gpu(tmp_path):
    manifest = make_manifest(tiny())
    write_fake_bundle(tmp_path, manifest)
    record = fake_build_record(manifest, [1])
    check_build_record(record, "10.3.0", GPU, manifest)
    with pytest.raises(EngineMismatch, match=r"TensorRT 10\.3\.0 on Orin.*TensorRT 10\.7\.0.*imagefolder-export trt"):
        check_build_record(record, "10.7.0", GPU, manifest)
    with pytest.raises(EngineMismatch, match="H100"):
        check_build_record(record, "10.3.0", {"name": "H100", "compute_capability": "9.0"}, manifest)
    # Compatibility flags relax exactly their own check.
    record["flags"] = {"hardware_compat": "ampere_plus", "version_compat": True}
    check_build_record(record, "11.4.0", {"name": "H100", "compute_capability": "9.0"}, manifest)
    with pytest.raises(EngineMismatch):
        check_build_record(record, "11.4.0", {"name": "T4", "compute_capability": "7.5"}, manifest)
    # A re-exported graph makes its engine stale.
    changed = dict(manifest, files={**manifest["files"], "fold.onnx": {"sha256": "0" * 64, "bytes": 1}})
    with pytest.raises(EngineMismatch, match="fold engine was built from another fold.onnx"):
        check_build_record(fake_build_record(manifest, [1]), "10.3.0", GPU, changed)


def test_versioned_names_raise_outside_their_version():
    class FakeTrt:
        __version__ = "10.3.0"

    with pytest.raises(trt_build.EngineBuildError, match="needs TensorRT 11.x"):
        trt_build._versioned(FakeTrt, "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "engines" / "x.plan"
    atomic_write_bytes(target, b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(trt_build.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["x.plan"]


def test_trt_check_runs_without_torch_and_its_inputs_fit_every_graph(tmp_path):
    """The target-side check imports no torch, and its random inputs are valid for every graph and scale."""
    import subprocess
    import sys

    code = (
        "import sys, imagefolder.runtime.engine_check, imagefolder.export.trt_build, imagefolder.export.triton; "
        "assert 'torch' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0

    import numpy as np
    import onnxruntime as ort

    from imagefolder.configs import tiny
    from imagefolder.core.bundle import load_bundle
    from imagefolder.core.specs import example_inputs
    from imagefolder.export.onnx_export import export_bundle
    from tests.models import randomized

    config = tiny()
    tokenizer, generator = randomized(config)
    bundle = load_bundle(export_bundle(tmp_path / "b", tokenizer, generator, config, progress=False))
    rng = np.random.default_rng(0)
    for graph, spec in bundle.specs.items():
        session = ort.InferenceSession(str(bundle.graph_path(graph)), providers=["CPUExecutionProvider"])
        for si in spec.served_scales(bundle.num_scales):
            feeds = example_inputs(spec, bundle.model, 2, si, rng, bundle.state_dtype, bundle.candidates)
            outputs = session.run(None, feeds)
            expected = bundle.shapes(graph, 2, si or 0)
            for out, meta in zip(outputs, session.get_outputs(), strict=True):
                assert out.shape == expected[meta.name], (graph, si, meta.name)
                assert np.isfinite(out).all() if out.dtype.kind == "f" else True
