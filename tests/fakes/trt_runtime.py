"""The run side of the fake TensorRT: ``Runtime``, ``ICudaEngine``, ``IExecutionContext``, ``EngineInspector``.

``execute_async_v3`` enqueues one *kernel* on the fake CUDA stream: when it runs (when the host waits for
the stream, as every queued operation of ``cudart.py``, or at each replay of a CUDA graph it was captured
into) it reads the inputs from the addresses bound at enqueue time, runs the plan's ONNX graph (as
``numerics.py`` rewrites it: bf16 emulated, TF32 if asked) on ONNX Runtime's CPU provider, scribbles over
the context's
activation memory and writes the outputs to their bound addresses. A kernel touching memory that is
not a live allocation large enough for the tensor faults with the sticky ``cudaErrorIllegalAddress``.

Rules mirrored (NvInferRuntime.h and pyCoreDoc.h of NVIDIA/TensorRT release/10.3 unless noted):

- ``deserialize_cuda_engine`` returns None for bytes that are not a plan, for a plan of another
  TensorRT version (unless built version-compatible, for the same or a later major, with
  ``engine_host_code_allowed``), and for another compute capability unless built hardware-compatible;
- a new context uses profile 0 (``getOptimizationProfile``: "all profiles will default to
  optimization profile 0"); ``set_optimization_profile_async`` out of range raises ``RuntimeError``
  (pyCore.cpp ``context_set_optimization_profile_async``) and drops the input shapes, which must then
  be set again ("Changing this value will invalidate all dynamic bindings");
- ``set_input_shape`` returns False for a non-input, a rank or fixed dimension that differs, or a shape
  outside the active profile's min..max ("satisfyProfile Runtime dimension does not satisfy any
  optimization profile");
- ``set_tensor_address`` returns False for an unknown name or a pointer not 256-byte aligned ("The
  pointer must have at least 256-byte alignment"); ``set_device_memory`` wants 256-byte alignment;
- ``execute_async_v3`` logs and returns False when: an input shape is unset, an I/O address is unset
  ("Address is not set for input tensor x"), a USER_MANAGED context has no device memory or less than
  ``get_device_memory_size_for_profile_v2`` of the active profile, the context still runs on another
  stream (the host has not synchronised it: one context must not execute on two streams at once), the
  profile was switched on another stream not yet synchronised ("Not synchronizing the stream used at
  enqueue with the stream used to set optimization profile asynchronously ... undefined behavior"),
  an output overlaps another I/O tensor or the activation memory (undefined behaviour in TensorRT;
  refused here), or the stream is a default stream or unknown. The default stream is legal in
  TensorRT (it adds ``cudaDeviceSynchronize`` calls): refusing it is this project's rule, stricter;
- under stream capture, the first enqueue after creating the context, switching its profile or
  changing an input shape performs set-up work that is not capturable: the capture is invalidated and
  the call returns False (trtexec ``sampleInference.cpp``: "Avoid capturing initialization calls by
  executing the enqueue function at least once before starting CUDA graph capture"; "the enqueue call
  may return false if the current CUDA graph capture fails"). A context with an ``IProfiler`` enqueues
  synchronously (``enqueue_emits_profile`` defaults to true), which no capture allows either.
"""

from __future__ import annotations

import json

import numpy as np

from tests.fakes.cudart import DEFAULT_STREAMS, OK, Fault, Op
from tests.fakes.cudart import cudaError_t as E
from tests.fakes.numerics import runnable
from tests.fakes.tensorrt import Dims, IHostMemory, IProfiler, pack_plan, unpack_plan

NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}
ALIGNMENT = 256
SCRATCH = "(activation memory)"


def ort_session(onnx_bytes: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


class Runtime:
    __slots__ = ("_logger", "_host_code", "_dla_core")

    def __init__(self, logger):
        self._logger, self._host_code, self._dla_core = logger, False, 0

    engine_host_code_allowed = property(
        lambda self: self._host_code, lambda self, value: object.__setattr__(self, "_host_code", bool(value))
    )
    DLA_core = property(
        lambda self: self._dla_core, lambda self, value: object.__setattr__(self, "_dla_core", int(value))
    )
    num_DLA_cores = property(lambda self: self._env.num_dla_cores)

    def deserialize_cuda_engine(self, serialized_engine):
        env = self._env
        unpacked = unpack_plan(bytes(serialized_engine))

        def refuse(message: str) -> None:
            env.report(
                self._logger, "ERROR", f"IRuntime::deserializeCudaEngine: Error Code 1: Serialization ({message})"
            )

        if unpacked is None:
            return refuse("Serialization assertion magicTagRead == kMAGIC_TAG failed. Magic tag does not match")
        header, onnx_bytes = unpacked
        built, here = header["tensorrt_version"], env.version
        version_compatible = "VERSION_COMPATIBLE" in header["flags"]
        if built != here and not (version_compatible and env.major >= int(built.split(".")[0])):
            return refuse(
                f"The engine plan file is not compatible with this version of TensorRT, expecting "
                f"library version {here} got {built}, please rebuild."
            )
        if version_compatible and not self._host_code:
            return refuse(
                "a version-compatible plan runs its embedded lean runtime only with engine_host_code_allowed = True"
            )
        cc, built_cc = env.compute_capability, header["device"]["compute_capability"]
        compat = header["hardware_compatibility_level"]
        fits = float(cc) >= 8.0 if compat == "AMPERE_PLUS" else cc == built_cc
        if not fits:
            return refuse(
                f"The engine plan file is generated on an incompatible device, expecting compute {cc} got "
                f"compute {built_cc}, please rebuild."
            )
        if header["device"]["name"] != env.cuda.name and compat == "NONE":
            env.report(
                self._logger,
                "WARNING",
                "Using an engine plan file across different models of devices is "
                "not recommended and is likely to affect performance or even cause "
                "errors.",
            )
        return env.trt.ICudaEngine(header, onnx_bytes, self._logger)


class ICudaEngine:
    __slots__ = ("_header", "_onnx", "_logger", "_session", "_io")

    def __init__(self, header: dict, onnx_bytes: bytes, logger):
        trt = self._env.trt
        self._header, self._onnx, self._logger, self._session = header, onnx_bytes, logger, None
        self._io = {t["name"]: dict(t, mode=trt.TensorIOMode.INPUT) for t in header["inputs"]}
        self._io.update({t["name"]: dict(t, mode=trt.TensorIOMode.OUTPUT) for t in header["outputs"]})

    def _ort_session(self):
        if self._session is None:
            tf32 = self._env.tf32_rounding and "TF32" in self._header["flags"]
            self._session = ort_session(runnable(self._onnx, tf32))
        return self._session

    def _tensor(self, name: str) -> dict | None:
        tensor = self._io.get(str(name))
        if tensor is None:
            self._env.report(self._logger, "ERROR", f"ICudaEngine: {name!r} is not the name of an I/O tensor")
        return tensor

    num_io_tensors = property(lambda self: len(self._io))
    num_layers = property(lambda self: len(self._header["layers"]))
    num_optimization_profiles = property(lambda self: len(self._header["profiles"]))
    device_memory_size_v2 = property(lambda self: max(p["device_memory"] for p in self._header["profiles"]))

    def get_tensor_name(self, index):
        names = list(self._io)
        return names[index] if 0 <= index < len(names) else None

    def get_tensor_mode(self, name):
        tensor = self._io.get(str(name))
        return tensor["mode"] if tensor else self._env.trt.TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        tensor = self._tensor(name)
        return getattr(self._env.trt.DataType, tensor["dtype"]) if tensor else None

    def get_tensor_shape(self, name):
        tensor = self._tensor(name)
        return Dims(tensor["shape"]) if tensor else Dims()

    def get_tensor_location(self, name):
        return self._env.trt.TensorLocation.DEVICE

    def get_tensor_profile_shape(self, name, profile_index):
        shapes = self._header["profiles"][profile_index]["shapes"].get(str(name))
        return [Dims(s) for s in shapes] if shapes else []

    def get_device_memory_size_for_profile_v2(self, profile_index):
        return self._header["profiles"][profile_index]["device_memory"]

    def create_execution_context(self, strategy=None):
        env = self._env
        trt, cuda = env.trt, env.cuda
        strategy = trt.ExecutionContextAllocationStrategy.STATIC if strategy is None else strategy
        if not isinstance(strategy, trt.ExecutionContextAllocationStrategy):
            raise TypeError(f"expected trt.ExecutionContextAllocationStrategy, got {strategy!r}")
        memory = None
        if strategy != trt.ExecutionContextAllocationStrategy.USER_MANAGED:
            if cuda.unsafe("createExecutionContext (cudaMalloc)") is not None:
                env.report(
                    self._logger,
                    "ERROR",
                    "createExecutionContext: Cuda Runtime (operation not permitted when stream is capturing)",
                )
                return None
            alloc = cuda._allocate(self.device_memory_size_v2, cuda.device, device=True)
            memory = (alloc.base, alloc.size)
        return trt.IExecutionContext(self, strategy, memory)

    def create_engine_inspector(self):
        return self._env.trt.EngineInspector(self)

    def serialize(self):
        return IHostMemory(pack_plan(self._header, self._onnx))


class EngineInspector:
    __slots__ = ("_engine",)

    def __init__(self, engine: ICudaEngine):
        self._engine = engine

    def _layer(self, index: int):
        header = self._engine._header
        layer, verbosity = header["layers"][index], header["profiling_verbosity"]
        if verbosity == "NONE":
            return None
        if verbosity == "LAYER_NAMES_ONLY":
            return layer["name"]
        return {"Name": layer["name"], "LayerType": layer["op"], "Origin": "ONNX"}

    def get_layer_information(self, layer_index, format):
        layer = self._layer(layer_index)
        if format == self._env.trt.LayerInformationFormat.JSON or not isinstance(layer, str):
            return json.dumps(layer)
        return layer

    def get_engine_information(self, format):
        engine = self._engine
        layers = [x for x in (self._layer(i) for i in range(engine.num_layers)) if x is not None]
        io_key = "Bindings" if self._env.major < 11 else "I/O Tensors"  # renamed in TensorRT 11
        if format == self._env.trt.LayerInformationFormat.JSON:
            return json.dumps({"Layers": layers, io_key: list(engine._io)})
        return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in layers)


class IExecutionContext:
    __slots__ = (
        "_engine",
        "_strategy",
        "_memory",
        "_profile",
        "_shapes",
        "_addresses",
        "_profiler",
        "_setup",
        "_busy",
        "_switch",
    )

    def __init__(self, engine: ICudaEngine, strategy, memory):
        self._engine, self._strategy, self._memory = engine, strategy, memory
        self._profile, self._shapes, self._addresses, self._profiler = 0, {}, {}, None
        self._setup, self._busy, self._switch = True, None, None

    engine = property(lambda self: self._engine)
    active_optimization_profile = property(lambda self: self._profile)

    def _error(self, call: str, message: str) -> bool:
        self._env.report(
            self._engine._logger, "ERROR", f"IExecutionContext::{call}: Error Code 3: API Usage Error ({message})"
        )
        return False

    def _set_profiler(self, profiler) -> None:
        if profiler is not None:
            if not isinstance(profiler, IProfiler):
                raise TypeError(f"expected trt.IProfiler, got {profiler!r}")
            IProfiler._check_initialised(profiler, "IProfiler")
        object.__setattr__(self, "_profiler", profiler)

    profiler = property(lambda self: self._profiler, _set_profiler)

    def set_device_memory(self, memory, size):
        if int(memory) % ALIGNMENT:
            self._error("setDeviceMemoryV2", f"memory 0x{int(memory):x} is not {ALIGNMENT}-byte aligned")
            return
        self._memory = (int(memory), int(size))

    def set_optimization_profile_async(self, profile_index, stream_handle):
        cuda = self._env.cuda
        if not 0 <= int(profile_index) < self._engine.num_optimization_profiles:
            self._error("setOptimizationProfileAsync", f"profile index {profile_index} is out of range")
            raise RuntimeError("Error in set optimization profile async.")
        try:
            stream = cuda.stream(stream_handle)
        except Fault:
            self._error("setOptimizationProfileAsync", f"stream {stream_handle!r} is not a live CUDA stream")
            raise RuntimeError("Error in set optimization profile async.") from None
        self._profile, self._shapes, self._setup = int(profile_index), {}, True
        # The switch may enqueue copies on that stream; an enqueue on another stream must wait for it.
        cuda.enqueue(stream.handle, Op("memcpy", "optimization profile switch", lambda _cuda: None))
        self._switch = (stream.handle, stream.seq)
        return True

    def _inputs(self) -> list[dict]:
        return [t for t in self._engine._io.values() if t["mode"] == self._env.trt.TensorIOMode.INPUT]

    def set_input_shape(self, name, shape):
        tensor, shape = self._engine._io.get(str(name)), tuple(int(d) for d in shape)
        if tensor is None or tensor["mode"] != self._env.trt.TensorIOMode.INPUT:
            return self._error("setInputShape", f"{name!r} is not an input tensor")
        network = tuple(tensor["shape"])
        if len(shape) != len(network) or any(n not in (-1, d) for n, d in zip(network, shape, strict=True)):
            return self._error("setInputShape", f"{name}: shape {shape} does not fit the network's {network}")
        low, _, high = self._engine._header["profiles"][self._profile]["shapes"][tensor["name"]]
        if any(not lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)):
            return self._error(
                "setInputShape",
                f"Parameter check failed, condition: satisfyProfile Runtime dimension "
                f"does not satisfy any optimization profile ({name} {shape} is outside "
                f"profile {self._profile}: {tuple(low)}..{tuple(high)})",
            )
        if self._shapes.get(tensor["name"]) != shape:
            self._shapes[tensor["name"]], self._setup = shape, True
        return True

    def infer_shapes(self):
        return [t["name"] for t in self._inputs() if -1 in t["shape"] and t["name"] not in self._shapes]

    def _input_shape(self, tensor: dict) -> tuple[int, ...]:
        return self._shapes.get(tensor["name"], tuple(tensor["shape"]))

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        from tests.fakes.trt_builder import output_shapes

        profile = self._engine._header["profiles"][self._profile]
        inputs = {t["name"]: (self._input_shape(t), t["dtype"]) for t in self._inputs()}
        if all(tuple(profile["shapes"][name][1]) == shape for name, (shape, _) in inputs.items()):
            return {name: tuple(s) for name, s in profile["outputs"].items()}
        return {name: tuple(s) for name, s in output_shapes(self._engine._ort_session(), inputs).items()}

    def get_tensor_shape(self, name):
        tensor = self._engine._tensor(name)
        if tensor is None:
            return Dims()
        if tensor["mode"] == self._env.trt.TensorIOMode.INPUT:
            return Dims(self._input_shape(tensor))
        if self.infer_shapes():
            return Dims(tensor["shape"])
        return Dims(self._output_shapes()[tensor["name"]])

    def set_tensor_address(self, name, memory):
        if str(name) not in self._engine._io:
            return self._error("setTensorAddress", f"{name!r} is not the name of an I/O tensor")
        if int(memory) % ALIGNMENT:
            return self._error("setTensorAddress", f"{name}: address 0x{int(memory):x} is not {ALIGNMENT}-byte aligned")
        self._addresses[str(name)] = int(memory)
        return True

    def get_tensor_address(self, name):
        return self._addresses.get(str(name), 0)

    def execute_async_v3(self, stream_handle):
        env, engine = self._env, self._engine
        cuda, trt = env.cuda, env.trt
        handle = int(stream_handle)
        cuda.check_pinned_races()
        if cuda.sticky is not None:  # TensorRT's kernel launches fail like every CUDA call on a broken context
            env.report(
                engine._logger,
                "ERROR",
                f"IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime ({cuda.sticky.name})",
            )
            return False
        if handle in DEFAULT_STREAMS:
            return self._error(
                "enqueueV3",
                "the default stream: TensorRT would add cudaDeviceSynchronize calls "
                "(refused by this project's rule: use a non-blocking stream)",
            )
        try:
            stream = cuda.stream(handle)
        except Fault:
            return self._error("enqueueV3", f"stream 0x{handle:x} is not a live CUDA stream")
        unset = self.infer_shapes()
        if unset:
            return self._error(
                "enqueueV3",
                f"input shapes not specified for {unset}; call set_input_shape after set_optimization_profile_async",
            )
        for name, tensor in engine._io.items():
            if not self._addresses.get(name):
                kind = "input" if tensor["mode"] == trt.TensorIOMode.INPUT else "output"
                return self._error(
                    "enqueueV3",
                    f"Address is not set for {kind} tensor {name}. Call "
                    f"setInputTensorAddress or setTensorAddress before enqueue/execute.",
                )
        need = engine.get_device_memory_size_for_profile_v2(self._profile)
        if self._memory is None:
            return self._error(
                "enqueueV3", "device memory is not set: a USER_MANAGED context needs set_device_memory before enqueue"
            )
        if self._memory[1] < need:
            return self._error(
                "enqueueV3",
                f"device memory of {self._memory[1]} bytes is smaller than the "
                f"{need} bytes profile {self._profile} needs",
            )
        for what, pending in (
            ("the context is still executing on", self._busy),
            ("the optimization profile was switched on", self._switch),
        ):
            if (
                pending
                and pending[0] != handle
                and pending[0] in cuda.streams
                and cuda.streams[pending[0]].done < pending[1]
            ):
                return self._error(
                    "enqueueV3",
                    f"{what} stream 0x{pending[0]:x}, which the host has not "
                    f"synchronised: a context must not run on two streams at once",
                )
        shapes = {t["name"]: self._input_shape(t) for t in self._inputs()}
        shapes.update(self._output_shapes())
        regions = {
            name: (self._addresses[name], int(np.prod(shape)) * np.dtype(NUMPY[engine._io[name]["dtype"]]).itemsize)
            for name, shape in shapes.items()
        }
        regions[SCRATCH] = (self._memory[0], need)
        for out, tensor in engine._io.items():
            if tensor["mode"] != trt.TensorIOMode.OUTPUT:
                continue
            o_start, o_size = regions[out]
            for other, (start, size) in regions.items():
                if other != out and o_start < start + size and start < o_start + o_size:
                    return self._error(
                        "enqueueV3",
                        f"output {out} overlaps {other}: TensorRT gives no aliasing "
                        f"guarantee between I/O tensors (undefined behaviour)",
                    )
        if stream.capture is not None and (self._setup or self._profiler is not None):
            stream.capture.invalidated = True
            why = (
                "a profiler makes enqueue synchronous"
                if self._profiler is not None
                else "the first enqueue after a context, profile or shape change does set-up work"
            )
            cuda.faults.append(f"enqueueV3 under capture: {why}; the capture is invalidated")
            env.report(
                engine._logger,
                "ERROR",
                f"IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (operation "
                f"not permitted when stream is capturing) [{why}]",
            )
            return False
        kernel = _kernel(engine, shapes, regions, self._profile)
        err = cuda.enqueue(handle, Op("kernel", kernel.__doc__, kernel, cost_ms=0.05))
        if err != OK:
            env.report(
                engine._logger, "ERROR", f"IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime ({E(err).name})"
            )
            return False
        if stream.capture is None:
            self._setup, self._busy = False, (handle, stream.seq)
            if self._profiler is not None:
                for layer in engine._header["layers"]:
                    self._profiler.report_layer_time(layer["name"], 0.001)
        return True


def _kernel(engine: ICudaEngine, shapes: dict, regions: dict, profile: int):
    """The work of one enqueue, frozen at enqueue time (a captured graph replays these addresses)."""
    trt = engine._env.trt
    inputs = [t for t in engine._io.values() if t["mode"] == trt.TensorIOMode.INPUT]
    outputs = [t for t in engine._io.values() if t["mode"] == trt.TensorIOMode.OUTPUT]

    def run(cuda) -> None:
        scratch = cuda.device_view(*regions[SCRATCH], "activation memory")
        feeds = {}
        for t in inputs:
            view = cuda.device_view(*regions[t["name"]], f"input {t['name']} {shapes[t['name']]}")
            feeds[t["name"]] = view.view(NUMPY[t["dtype"]]).reshape(shapes[t["name"]]).copy()
        targets = {
            t["name"]: cuda.device_view(*regions[t["name"]], f"output {t['name']} {shapes[t['name']]}") for t in outputs
        }
        scratch[:] = 0xA5  # activations overwrite whatever the scratch held
        session = engine._ort_session()
        for meta, value in zip(session.get_outputs(), session.run(None, feeds), strict=True):
            if tuple(value.shape) != tuple(shapes[meta.name]):
                raise Fault(
                    E.cudaErrorIllegalAddress, f"output {meta.name} came out {value.shape}, not {shapes[meta.name]}"
                )
            dtype = NUMPY[engine._io[meta.name]["dtype"]]
            targets[meta.name][:] = np.ascontiguousarray(value, dtype=dtype).view(np.uint8).ravel()

    run.__doc__ = f"TensorRT enqueue (profile {profile})"
    return run


PUBLIC = [Runtime, ICudaEngine, EngineInspector, IExecutionContext]
