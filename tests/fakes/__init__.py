"""Strict test doubles of TensorRT and cuda-python, for running the TensorRT path where neither exists.

Test-only: the product never imports this package. ``installed(...)`` puts a fake ``tensorrt``
(``tensorrt.py``, ``trt_builder.py``, ``trt_runtime.py``; version 10.3.0 or 11.4.0) and a fake
cuda-python runtime (``cudart.py``; as ``cuda.bindings.runtime`` and ``cuda.cudart``) into
``sys.modules`` for the duration of a ``with`` block, both bound to one simulated GPU, and takes
them out again afterwards. The ``fake_gpu`` fixture in ``tests/conftest.py`` does it for one test;
parametrise it indirectly with a TensorRT version::

    @pytest.mark.parametrize("fake_gpu", ["10.3.0", "11.4.0"], indirect=True)
    def test_x(fake_gpu): ...

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

from tests.fakes.cudart import FakeCuda
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
    """``imagefolder.core.cuda`` caches the cuda-python module it found; forget it."""
    module = sys.modules.get("imagefolder.core.cuda")
    if module is not None:
        module._cudart = None


@contextlib.contextmanager
def installed(
    trt_version: str = VERSIONS[0],
    gpu_name: str = DEFAULT_GPU[0],
    compute_capability: tuple[int, int] = DEFAULT_GPU[1],
    num_dla_cores: int = 0,
    total_memory: int = 8 << 30,
) -> Iterator[FakeGpu]:
    """Fake ``tensorrt`` and cuda-python in ``sys.modules`` for the block, on one simulated GPU."""
    cuda = FakeCuda(gpu_name, compute_capability, total_memory)
    trt = make_module(trt_version, cuda, num_dla_cores)
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
