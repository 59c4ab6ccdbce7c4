"""Strict test doubles of TensorRT and cuda-python, for running the TensorRT path where neither exists.

Test-only: the product never imports this package. ``installed(...)`` puts a fake ``tensorrt``
(``tensorrt.py``, ``trt_builder.py``, ``trt_runtime.py``; version 10.3.0 or 11.4.0) and a fake
cuda-python runtime (``cudart.py``; as ``cuda.bindings.runtime`` and ``cuda.cudart``) into
``sys.modules`` for the duration of a ``with`` block, both bound to one simulated GPU, and takes
them out again afterwards. The ``fake_gpu`` fixture in ``tests/conftest.py`` does it for one test;
parametrise it indirectly with a TensorRT version::

    @pytest.mark.parametrize("fake_gpu", ["10.3.0", "11.4.0"], indirect=True)
    def test_x(fake_gpu): ...

``driver_error`` makes every CUDA call fail from the start, as the real runtime does on a machine
whose driver is older than cuda-python's CUDA (``cudaErrorInsufficientDriver``, 35) or that has no
GPU (``cudaErrorNoDevice``, 100).

What each fake enforces, and where the real rule is documented, is in each module's docstring.
``triton.py`` is a stand-in for Triton's Python backend (``triton_python_backend_utils`` and the server's
side of the model contract), used by ``tests/test_triton.py`` together with these fakes.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

from tests.fakes.cudart import FakeCuda, cudaError_t
from tests.fakes.tensorrt import VERSIONS, Env, make_module, unpack_plan

MODULES = ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")
DEFAULT_GPU = ("Fake Orin", (8, 7))


@dataclass
class FakeGpu:
    """The installed fakes: ``cuda`` (the simulated device), ``trt`` and ``cudart`` (the modules)."""

    cuda: FakeCuda
    trt: types.ModuleType
    cudart: types.ModuleType

    @property
    def env(self) -> Env:
        return self.trt._env

    def trt_errors(self) -> list[str]:
        """Every error TensorRT logged, whatever the logger's minimum severity."""
        return self.env.errors()

    @staticmethod
    def plan_header(plan: bytes) -> dict:
        unpacked = unpack_plan(plan)
        assert unpacked is not None, "not a plan of the fake TensorRT"
        return unpacked[0]


def _reset_product_cache() -> None:
    """Forget the tensorrt and cuda-python modules found earlier: ``imagefolder.core.cuda`` caches its
    cuda-python module, polygraphy each lazily imported module (its ``LazyModule`` proxies) and the
    TensorRT logger it made for that module (a logger of one fake's ``ILogger`` must not reach another)."""
    module = sys.modules.get("imagefolder.core.cuda")
    if module is not None:
        module._cudart = None
    for name, loaded in list(sys.modules.items()):
        if not name.startswith("polygraphy") or loaded is None:
            continue
        for value in list(vars(loaded).values()):
            if type(value).__name__ == "LazyModule" and getattr(vars(value).get("module"), "__name__", "") in MODULES:
                object.__setattr__(value, "module", None)
    trt_util = sys.modules.get("polygraphy.backend.trt.util")
    if trt_util is not None:
        trt_util.TRT_LOGGER = None


@contextlib.contextmanager
def installed(
    trt_version: str = VERSIONS[0],
    gpu_name: str = DEFAULT_GPU[0],
    compute_capability: tuple[int, int] = DEFAULT_GPU[1],
    num_dla_cores: int = 0,
    total_memory: int = 8 << 30,
    driver_error: str | None = None,
    tf32_rounding: bool = False,
) -> Iterator[FakeGpu]:
    """Fake ``tensorrt`` and cuda-python in ``sys.modules`` for the block, on one simulated GPU
    (or, with ``driver_error`` such as "cudaErrorInsufficientDriver", on none that any call reaches).
    ``tf32_rounding``: engines built with the TF32 flag round their products as tensor cores do (numerics.py)."""
    cuda = FakeCuda(gpu_name, compute_capability, total_memory)
    if driver_error is not None:
        cuda.sticky = getattr(cudaError_t, driver_error)  # every call returns it first, as a broken context does
    trt = make_module(trt_version, cuda, num_dla_cores, tf32_rounding)
    runtime = cuda.module("cuda.bindings.runtime")
    package = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    package.__path__, bindings.__path__ = [], []
    package.bindings, package.cudart, bindings.runtime = bindings, runtime, runtime
    fakes = dict(zip(MODULES, (trt, package, bindings, runtime, runtime), strict=True))
    saved = {name: sys.modules.get(name) for name in MODULES}
    sys.modules.update(fakes)
    _reset_product_cache()
    try:
        yield FakeGpu(cuda, trt, runtime)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        _reset_product_cache()
