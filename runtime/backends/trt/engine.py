"""One TensorRT engine (a graph's plan) and its execution contexts, one per optimization profile.

``Engine`` deserialises ``BUNDLE/engines/<graph>.plan``, checks its I/O against the bundle, and hands out
``ExecutionContext``s that share one user-managed scratch allocation. No torch; TensorRT objects are named
``trt_*`` so ``tests/test_trt_api_names.py`` can check every call against the TensorRT 10.3 and 11.4 listings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from imagefolder.core import cuda
from imagefolder.core.engines import (
    REBUILD_HINT,
    EngineMismatch,
)
from imagefolder.errors import EngineError
from imagefolder.io import sha256_file

log = logging.getLogger(__name__)


def _numpy_dtypes(trt) -> dict:
    return {
        trt.DataType.FLOAT: np.dtype("float32"),
        trt.DataType.HALF: np.dtype("float16"),
        trt.DataType.INT32: np.dtype("int32"),
        trt.DataType.INT64: np.dtype("int64"),
        trt.DataType.INT8: np.dtype("int8"),
        trt.DataType.UINT8: np.dtype("uint8"),
        trt.DataType.BOOL: np.dtype("bool"),
    }


def _layer_profiler(trt, sink: dict[str, list[float]]):
    """An ``IProfiler`` appending each layer's milliseconds to ``sink[layer]``."""

    class LayerProfiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):
            sink.setdefault(layer_name, []).append(float(ms))

    return LayerProfiler()


class ExecutionContext:
    """An execution context pinned to one optimization profile, with that profile's input shapes set."""

    def __init__(self, engine: Engine, profile: dict, trt_context):
        self.engine, self.profile, self.trt_context = engine, profile, trt_context
        self.index = int(profile["index"])
        self.bound: dict[str, int] | None = None

    def bind(self, addresses: dict[str, int]) -> None:
        """Set the device address of every I/O tensor (all of them; a missing name is an error)."""
        if addresses == self.bound:
            return
        names = set(self.engine.io_names)
        if set(addresses) != names:
            raise KeyError(f"{self.engine.name}: bound {sorted(addresses)}, the engine's tensors are {sorted(names)}")
        for name, ptr in addresses.items():
            if not self.trt_context.set_tensor_address(name, int(ptr)):
                raise RuntimeError(f"{self.engine.name}: TensorRT refused the address of {name}")
        self.bound = dict(addresses)

    def execute(self, stream: cuda.Stream) -> None:
        if not self.trt_context.execute_async_v3(stream.ptr):
            raise RuntimeError(f"{self.engine.name} (profile {self.index}): execute_async_v3 failed, see its log")
        stream.count()


class Engine:
    """One TensorRT engine with an explicit lifecycle: ``load`` → ``activate`` → ``context`` → ``close``.

    ``load`` reads and checks the plan and deserialises it; ``activate`` gives it the shared scratch
    memory; ``new_context(profile)`` creates an execution context of one profile, with its shapes
    set (a session owns the ones it binds), ``context(profile)`` the engine's own shared one (for
    single runs). Usable as a context manager; nothing is released in ``__del__``.
    """

    def __init__(self, trt, trt_runtime, name: str, path: Path, entry: dict, layer_profile: bool = False):
        self.trt, self.trt_runtime = trt, trt_runtime
        self.name, self.path, self.entry = name, path, entry
        self.layer_profile = layer_profile
        self.layer_times: dict[str, list[float]] = {}
        self.trt_engine: Any = None  # trt.ICudaEngine once loaded
        self.scratch: cuda.DeviceBuffer | None = None
        self.contexts: dict[int, ExecutionContext] = {}
        self.io_names: list[str] = []
        self._profilers: list = []  # kept alive while their contexts may call them

    def load(self) -> Engine:
        if not self.path.is_file():
            raise EngineMismatch(f"{self.path} is missing; {REBUILD_HINT}")
        if sha256_file(self.path) != self.entry["sha256"]:
            raise EngineMismatch(f"{self.path} differs from its build record (sha256); {REBUILD_HINT}")
        self.trt_engine = self.trt_runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.trt_engine is None:
            raise EngineMismatch(f"TensorRT could not deserialise {self.path}; {REBUILD_HINT}")
        self.io_names = [self.trt_engine.get_tensor_name(i) for i in range(self.trt_engine.num_io_tensors)]
        if self.trt_engine.num_optimization_profiles != len(self.entry["profiles"]):
            raise EngineMismatch(f"{self.path}: profile count differs from its build record; {REBUILD_HINT}")
        return self

    def scratch_size(self) -> int:
        """Bytes of activation memory the largest profile needs."""
        return max(
            int(self.trt_engine.get_device_memory_size_for_profile_v2(i))
            for i in range(self.trt_engine.num_optimization_profiles)
        )

    def activate(self, scratch: cuda.DeviceBuffer) -> None:
        self.scratch = scratch

    def profile_for(self, batch: int, scale_index: int | None) -> dict:
        for profile in self.entry["profiles"]:
            if profile["batch"] == batch and profile["scale_index"] == scale_index:
                return profile
        built = sorted({p["batch"] for p in self.entry["profiles"]})
        raise EngineError(
            f"the {self.name} engine has no profile for batch {batch} (scale {scale_index}); it was built "
            f"for batches {built}: rebuild with `imagefolder-export trt BUNDLE --batch ...`"
        )

    def check_io(self, tensors: dict[str, dict]) -> None:
        """The engine's tensors have the manifest's names, directions and dtypes."""
        trt, trt_engine = self.trt, self.trt_engine
        if set(self.io_names) != set(tensors):
            raise EngineMismatch(f"{self.name}: engine tensors {sorted(self.io_names)} != manifest {sorted(tensors)}")
        to_numpy = _numpy_dtypes(trt)
        for name, spec in tensors.items():
            is_input = trt_engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = to_numpy.get(trt_engine.get_tensor_dtype(name))
            if is_input != spec["is_input"] or dtype != np.dtype(spec["dtype"]):
                raise EngineMismatch(
                    f"{self.name}.{name}: engine has {'input' if is_input else 'output'} {dtype}, the manifest "
                    f"{'input' if spec['is_input'] else 'output'} {spec['dtype']}; {REBUILD_HINT}"
                )

    def context(self, profile: dict, stream: cuda.Stream) -> ExecutionContext:
        """The engine's shared context of ``profile``, created on first use (single runs: checks, encode, decode)."""
        index = int(profile["index"])
        if index not in self.contexts:
            self.contexts[index] = self.new_context(profile, stream)
        return self.contexts[index]

    def new_context(self, profile: dict, stream: cuda.Stream) -> ExecutionContext:
        """A new execution context on ``profile`` with the shared scratch and the profile's shapes."""
        index = int(profile["index"])
        if self.scratch is None:
            raise RuntimeError(f"engine {self.name} is not activated")
        trt, trt_engine = self.trt, self.trt_engine
        trt_context = trt_engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if trt_context is None:
            raise RuntimeError(f"{self.name}: TensorRT could not create an execution context")
        trt_context.set_device_memory(self.scratch.ptr, self.scratch.nbytes)
        if not trt_context.set_optimization_profile_async(index, stream.ptr):
            raise RuntimeError(f"{self.name}: cannot select optimization profile {index}")
        # The profile switch may enqueue copies on the stream; later work on the same stream is ordered after it.
        for name, shape in profile["shapes"].items():
            if not trt_context.set_input_shape(name, tuple(shape)):
                raise RuntimeError(f"{self.name}: TensorRT refused shape {shape} for {name} in profile {index}")
        if self.layer_profile:
            profiler = _layer_profiler(trt, self.layer_times)
            self._profilers.append(profiler)
            trt_context.profiler = profiler
        return ExecutionContext(self, profile, trt_context)

    def inspect(self) -> str:
        """The engine inspector's JSON description (layer details need a DETAILED build)."""
        trt_inspector = self.trt_engine.create_engine_inspector()
        return trt_inspector.get_engine_information(self.trt.LayerInformationFormat.JSON)

    def close(self) -> None:
        self.contexts.clear()  # contexts before their engine
        self._profilers.clear()
        self.trt_engine = None
        self.scratch = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
