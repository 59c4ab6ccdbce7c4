"""Whether the real-GPU tests run here: skip only where TensorRT or a GPU is absent, fail on anything else.

A probe that caught every exception turned a broken GPU machine into a green run: with cuda-python 13
on a CUDA 12 driver every CUDA call fails with error 35, and every GPU test was skipped. So
``skip_reason`` answers "skip" for exactly two facts, a package that is not installed and a machine
without a CUDA GPU, and lets every other failure propagate: the driver mismatch (a ``CudaError``
naming it), a TensorRT that is installed but does not import, a device that errors.
"""

from __future__ import annotations

from imagefolder.core import cuda

INSTALL = "pip install 'imagefolder[gpu-cu12]' (or gpu-cu13, jetson; see README.md) on a machine with an NVIDIA GPU"


def _not_installed(err: BaseException, top: str) -> bool:
    """Is ``err`` the import of package ``top`` failing because it is absent (not because it is broken)?"""
    return isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == top


def skip_reason() -> str | None:
    """Why the TensorRT GPU tests cannot run here (TensorRT, cuda-python or a GPU is absent), or None.

    Raises:
        anything else that goes wrong: a broken installation must fail the run, not skip it.
    """
    try:
        import tensorrt  # noqa: F401
    except ModuleNotFoundError as err:
        if _not_installed(err, "tensorrt"):
            return f"TensorRT is not installed: {INSTALL}"
        raise
    try:
        cuda.cudart()
    except cuda.CudaUnavailable as err:
        if _not_installed(err.__cause__ or err, "cuda"):
            return f"cuda-python is not installed: {INSTALL}"
        raise
    if cuda.device_count() == 0:
        return "no CUDA GPU on this machine"
    return None
