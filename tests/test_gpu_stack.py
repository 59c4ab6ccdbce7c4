"""The TensorRT stack's install hints name the right extra per machine, and the GPU tests skip only for absence.

The messages are checked for each kind of machine by pinning what ``core.gpu_stack`` reads (the Jetson
release file, the driver's CUDA version). The GPU-test probe (``tests/gpu_probe.py``) runs on the fakes:
absent TensorRT, absent cuda-python and a machine without a GPU skip; a driver older than cuda-python's
CUDA (error 35), a TensorRT that fails to import and a device error fail, and the real GPU test module
fails its collection under a too-old driver instead of skipping.
"""

from __future__ import annotations

import importlib.abc
import subprocess
import sys
from pathlib import Path

import pytest

from imagefolder.core import cuda, gpu_stack
from imagefolder.core.engines import TensorRTUnavailable, import_tensorrt
from tests import gpu_probe
from tests.fakes import installed

CUDA_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")
MACHINES = {
    "CUDA 12 driver": (False, (12, 4)),
    "CUDA 13 driver": (False, (13, 0)),
    "no driver": (False, None),
    "Jetson": (True, (12, 6)),
}


@pytest.fixture(params=list(MACHINES))
def machine(request, monkeypatch) -> str:
    jetson, driver = MACHINES[request.param]
    monkeypatch.setattr(gpu_stack, "is_jetson", lambda: jetson)
    monkeypatch.setattr(gpu_stack, "driver_cuda_version", lambda: driver)
    return request.param


EXTRA = {"CUDA 12 driver": "gpu-cu12", "CUDA 13 driver": "gpu-cu13", "no driver": "gpu-cu12", "Jetson": "jetson"}


def test_the_extra_follows_the_machine(machine):
    assert gpu_stack.gpu_extra() == EXTRA[machine]


def test_missing_tensorrt_names_what_installs_it_here(machine, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable) as caught:
        import_tensorrt()
    message = str(caught.value)
    assert caught.value.extra == EXTRA[machine] and isinstance(caught.value, ImportError)
    if machine == "Jetson":
        assert "sudo apt install python3-libnvinfer" in message and "--system-site-packages" in message
        assert "pip install" not in message  # no extra brings JetPack's TensorRT
    else:
        assert f"pip install 'imagefolder[{EXTRA[machine]}]'" in message


def test_missing_cuda_python_names_the_extra(machine, monkeypatch):
    for name in CUDA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(cuda, "_cudart", None)
    with pytest.raises(cuda.CudaUnavailable, match=rf"cuda-python is not installed.*imagefolder\[{EXTRA[machine]}\]"):
        cuda.DeviceBuffer(16)


def test_error_35_names_the_driver_and_cuda_python_mismatch(monkeypatch):
    monkeypatch.setattr(gpu_stack, "is_jetson", lambda: False)
    monkeypatch.setattr(gpu_stack, "driver_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(gpu_stack, "cuda_python_version", lambda: "13.4.4")
    with installed(driver_error="cudaErrorInsufficientDriver"), pytest.raises(cuda.CudaError) as caught:
        cuda.device_properties()
    message = str(caught.value)
    assert message.startswith("CUDA error 35 (cudaErrorInsufficientDriver)")
    assert "driver is older than the CUDA that cuda-python 13.4.4 was built for" in message
    assert "it supports CUDA 12.4" in message and "pip install 'imagefolder[gpu-cu12]'" in message


def test_driver_version_reads_nothing_without_a_driver():
    # This machine has no NVIDIA driver; on one that has, the version is a (major, minor) pair.
    version = gpu_stack.driver_cuda_version()
    assert version is None or (len(version) == 2 and version[0] >= 10)


# -- the probe of tests/test_trt_gpu.py ----------------------------------------------------------------------------


def test_probe_runs_the_gpu_tests_where_everything_is_present():
    with installed():
        assert gpu_probe.skip_reason() is None


@pytest.mark.parametrize(
    "absent, reason",
    [
        ("tensorrt", "TensorRT is not installed"),
        ("cuda-python", "cuda-python is not installed"),
        ("gpu", "no CUDA GPU"),
    ],
)
def test_probe_skips_only_for_what_is_absent(monkeypatch, absent, reason):
    # The hiding is undone before the fakes leave, or undoing it would put the fakes back into sys.modules.
    with installed(driver_error="cudaErrorNoDevice" if absent == "gpu" else None), monkeypatch.context() as hidden:
        if absent == "tensorrt":
            hidden.setitem(sys.modules, "tensorrt", None)
        elif absent == "cuda-python":
            for name in CUDA_MODULES:
                hidden.setitem(sys.modules, name, None)
        assert reason in gpu_probe.skip_reason()


class _BrokenTensorRT(importlib.abc.MetaPathFinder):
    """``import tensorrt`` finds a package whose shared library is missing, as a half-installed wheel does."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorrt":
            raise ImportError("libnvinfer.so.10: cannot open shared object file: No such file or directory")
        return None


@pytest.mark.parametrize("failure", ["driver older than cuda-python", "tensorrt does not import", "device error"])
def test_probe_fails_for_anything_but_absence(monkeypatch, failure):
    if failure == "driver older than cuda-python":
        with installed(driver_error="cudaErrorInsufficientDriver"), pytest.raises(cuda.CudaError, match="35"):
            gpu_probe.skip_reason()
    elif failure == "tensorrt does not import":
        monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_BrokenTensorRT(), *sys.meta_path])
        with pytest.raises(ImportError, match="libnvinfer"):
            gpu_probe.skip_reason()
    else:
        with installed(driver_error="cudaErrorIllegalAddress"), pytest.raises(cuda.CudaError, match="700"):
            gpu_probe.skip_reason()


def test_the_gpu_tests_fail_rather_than_skip_on_a_driver_too_old(tmp_path):
    """The whole module under a driver older than cuda-python's CUDA: collection fails, nothing is skipped."""
    code = (
        "import sys; from tests.fakes import installed; "
        "fakes = installed(driver_error='cudaErrorInsufficientDriver'); fakes.__enter__(); import pytest; "
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--basetemp', {str(tmp_path / 'run')!r}, "
        "'tests/test_trt_gpu.py']))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 5), output[-3000:]  # 5: no tests collected
    assert "cudaErrorInsufficientDriver" in output and "driver is older than" in output, output[-3000:]
    assert "skipped" not in output and " passed" not in output, output[-3000:]


@pytest.mark.parametrize(
    "driver, compute, trt_version, cuda_major, problem",
    [
        ("535.183.01", "8.0", "11.4.0", 12, None),
        ("530.30.02", "8.0", "11.4.0", 12, "older than R535, which TensorRT 11.4.0 (tensorrt-cu12) needs"),
        ("530.30.02", "8.0", "11.4.0", None, "older than R535"),  # no wheel metadata: PyPI's CUDA 12 build
        ("575.51.03", "9.0", "11.4.0", 13, "older than R580, which TensorRT 11.4.0 (tensorrt-cu13) needs"),
        ("525.60.13", "7.0", "10.3.0", 12, None),  # TensorRT 10 on a CUDA 12 driver; no Turing floor recorded
        ("550.54.15", "7.0", "11.4.0", 12, "compute capability 7.0) is older than Turing (7.5)"),
    ],
)
def test_the_driver_and_gpu_floors_of_the_installed_tensorrt(driver, compute, trt_version, cuda_major, problem):
    found = gpu_stack.driver_problem(driver, compute, trt_version, cuda_major)
    assert found is None if problem is None else problem in found
