"""The TensorRT path's software stack: which extra installs it on this machine, and what a missing piece says.

TensorRT, cuda-python, polygraphy, ONNX Runtime and onnx come as one extra per CUDA major
(``pyproject.toml``: ``gpu-cu12``, ``gpu-cu13``), or as ``jetson`` on JetPack, whose TensorRT comes
from apt. Which one fits depends on the machine, so every message about a missing package of the
stack names the extra for *this* machine:

- a Jetson (Jetson Linux writes ``/etc/nv_tegra_release``): ``jetson``, and TensorRT from
  ``python3-libnvinfer`` (PyPI's aarch64 TensorRT wheels are SBSA builds that do not run on JetPack 6);
- elsewhere the driver decides. cuda-python 13 and the CUDA 13 builds refuse a driver older than
  CUDA 13 with CUDA error 35, so the extra follows the newest CUDA the driver supports, read with
  ``cuDriverGetVersion`` through ctypes (that works where cuda-python is missing or is the wrong one).
  Without a driver: ``gpu-cu12``, which CUDA 12 and CUDA 13 drivers both run.

No torch; nothing is imported or loaded until a function is called.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from pathlib import Path

from imagefolder.errors import MissingDependency

JETSON_RELEASE = Path("/etc/nv_tegra_release")
JETSON_TENSORRT = (
    "sudo apt install python3-libnvinfer (JetPack's TensorRT, for the system Python; "
    "make the virtual environment with --system-site-packages so that it sees it)"
)
CUDA_EXTRAS = {12: "gpu-cu12", 13: "gpu-cu13"}


def is_jetson() -> bool:
    """Is this a Jetson running Jetson Linux (JetPack)?"""
    return JETSON_RELEASE.is_file()


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed NVIDIA driver supports, e.g. (12, 6); None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def gpu_extra() -> str:
    """The extra that installs a working TensorRT stack here: ``jetson``, ``gpu-cu13`` or ``gpu-cu12``."""
    if is_jetson():
        return "jetson"
    driver = driver_cuda_version()
    return CUDA_EXTRAS[13] if driver is not None and driver[0] >= 13 else CUDA_EXTRAS[12]


def _why_this_extra(extra: str) -> str:
    if extra == "jetson":
        return "the extra for JetPack"
    driver = driver_cuda_version()
    if driver is None:
        return "no NVIDIA driver found; that stack runs on CUDA 12 and 13 drivers"
    return f"the stack for this driver, which supports CUDA {driver[0]}.{driver[1]}"


def missing(
    package: str, err: BaseException | None = None, purpose: str = "", cls: type[MissingDependency] = MissingDependency
) -> MissingDependency:
    """A ``cls`` error for a package of the TensorRT stack that failed to import, naming this machine's extra."""
    extra = gpu_extra()
    if package == "TensorRT" and extra == "jetson":
        return cls(package, extra, err, purpose, install=JETSON_TENSORRT)
    return cls(package, extra, err, purpose, hint=_why_this_extra(extra))


def cuda_python_version() -> str | None:
    """The installed cuda-python (or, without its metapackage, cuda-bindings) version; None if unknown."""
    for distribution in ("cuda-python", "cuda-bindings"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def insufficient_driver_hint() -> str:
    """What CUDA error 35 (cudaErrorInsufficientDriver) means here and what to install instead."""
    driver = driver_cuda_version()
    have = f"it supports CUDA {driver[0]}.{driver[1]}" if driver else "its version could not be read"
    version = cuda_python_version()
    return (
        f"the NVIDIA driver is older than the CUDA that cuda-python{f' {version}' if version else ''} was built for "
        f"({have}): install the stack of the driver's CUDA major, pip install 'imagefolder[{gpu_extra()}]' "
        "(it pins cuda-python and TensorRT to that major), or update the driver"
    )


def require(module: str, package: str, purpose: str = ""):
    """Import ``module`` of the TensorRT stack (e.g. ``onnxruntime``), or raise ``missing(package)``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise missing(package, err, purpose) from err


# ---------------------------------------------------------------------------------------------------------------------
# Driver floors: what the installed TensorRT needs of the driver and the GPU (docs/gpu-first-run.md, §1)

# (TensorRT major, CUDA major of its build) → the oldest Linux driver branch it runs on. NVIDIA's TensorRT 11
# prerequisites: "r580+ ... for the CUDA 13.x packages and wheels. The lower r535+ on Linux ... applies to the
# CUDA 12.x packages and wheels"; TensorRT 10's CUDA 12 builds run on every CUDA 12 driver (R525+).
DRIVER_FLOORS = {(11, 12): 535, (11, 13): 580, (10, 12): 525, (10, 13): 580}
# TensorRT 11 needs a Turing or newer GPU ("NVIDIA GPU (Turing architecture or later)").
COMPUTE_FLOORS = {11: (7, 5)}


def tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheel was built for (tensorrt-cu12 / -cu13); None if unknown."""
    for major in (13, 12):
        for distribution in (f"tensorrt-cu{major}", f"tensorrt_cu{major}_bindings", f"tensorrt_cu{major}_libs"):
            try:
                importlib.metadata.version(distribution)
                return major
            except importlib.metadata.PackageNotFoundError:
                continue
    return None


def driver_problem(driver: str, compute_capability: str | None, trt_version: str, cuda_major: int | None) -> str | None:
    """One line saying why this driver or GPU cannot run this TensorRT, or None when they fit.

    ``driver`` is nvidia-smi's ``driver_version`` (e.g. "535.183.01"); ``cuda_major`` the CUDA major of the
    TensorRT build (None, when no wheel metadata says: a CUDA 12 build, PyPI's ``tensorrt-cu12``).
    """
    trt_major = int(str(trt_version).split(".")[0])
    cuda = cuda_major or 12
    floor = DRIVER_FLOORS.get((trt_major, cuda))
    branch = int(str(driver).split(".")[0])
    package = f"tensorrt-cu{cuda}"
    if floor is not None and branch < floor:
        older = " (or pip install 'tensorrt-cu12<11', which runs on R525+)" if trt_major >= 11 and cuda == 12 else ""
        return (
            f"driver {driver} is older than R{floor}, which TensorRT {trt_version} ({package}) needs: "
            f"update the driver{older}"
        )
    lowest = COMPUTE_FLOORS.get(trt_major)
    if lowest is not None and compute_capability:
        have = tuple(int(x) for x in str(compute_capability).split(".")[:2])
        if have < lowest:
            return (
                f"this GPU (compute capability {compute_capability}) is older than Turing (7.5), which TensorRT "
                f"{trt_version} needs: pip install 'tensorrt-cu12<11' for TensorRT 10"
            )
    return None


def onnxruntime_distributions() -> list[str]:
    """The ONNX Runtime distributions installed: more than one share the ``onnxruntime`` module and clash."""
    found = []
    for distribution in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(distribution)
            found.append(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
