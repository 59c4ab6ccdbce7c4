"""The build side of the fake TensorRT: ``Builder``, ``OnnxParser``, ``IBuilderConfig``, profiles, timing caches.

Rules mirrored, with where the real behaviour is documented:

- ``OnnxParser.parse_from_file`` (and ``parse(model_bytes, path=None)``, which polygraphy's
  ``inspect capability`` calls) loads the model with ``onnx`` (external data relative to the file)
  and records one ``ParserError`` per problem: an unreadable model (``MODEL_DESERIALIZE_FAILED``), an
  opset outside 9..20 on 10.x (onnx-tensorrt ``docs/operators.md``, "TensorRT 10.0 supports operators
  in the inclusive range of opset 9 to opset 20"), and every node whose operator onnx-tensorrt marks
  unsupported or that lives in a custom domain without a plugin (``UNSUPPORTED_NODE``, with the
  node's index, name and operator). ``ParserError`` has ``code/desc/node/node_name/node_operator``
  (``python/src/parsers/pyOnnx.cpp``).
- A network input is a *shape tensor* when its values feed a shape operand (Reshape's shape, Expand,
  Tile, Slice, TopK's K, ...): a one-hop approximation of TensorRT's analysis.
- ``IOptimizationProfile.set_shape`` raises ``RuntimeError`` ("Shape provided for opt is inconsistent
  with other shapes.") when min <= opt <= max fails or the ranks differ (pyCore.cpp
  ``opt_profile_set_shape``; NvInferRuntime.h ``IOptimizationProfile::setDimensions``);
  ``IBuilderConfig.add_optimization_profile`` returns the profile's index, or -1 for an invalid
  (empty) profile (pyCoreDoc.h ``add_optimization_profile``).
- ``build_serialized_network`` returns None and logs an error when a dynamic input has no profile,
  a profile misses an input or names an unknown one, a rank or fixed dimension differs from the
  network's, the optimisation level is outside 0..5, a DLA core does not exist, or the progress
  monitor cancels (``step_complete`` returned False).
- ``create_timing_cache(b"")`` makes a new cache; ``set_timing_cache(cache, ignore_mismatch=False)``
  returns False for a cache from another device or TensorRT version (pyCoreDoc.h ``set_timing_cache``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from tests.fakes.tensorrt import (
    Dims,
    IHostMemory,
    IProgressMonitor,
    pack_plan,
    pack_timing_cache,
    unpack_timing_cache,
)

# onnx-tensorrt docs/operators.md: operators marked N in every edition from TensorRT 8.5 to 10.x.
UNSUPPORTED_OPS = frozenset(
    {
        "BitShift",
        "Compress",
        "ConcatFromSequence",
        "ConvInteger",
        "Det",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "MelWeightMatrix",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "QLinearConv",
        "QLinearMatMul",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "StringNormalizer",
        "TfIdfVectorizer",
        "Unique",
    }
)
# (operator, input positions) whose values become shapes.
SHAPE_OPERANDS = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "TopK": (1,),
    "Resize": (2, 3),
    "OneHot": (1,),
    "Pad": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Split": (1,),
}
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8"}


class ITensor:
    __slots__ = ("_name", "_shape", "_dtype", "_shape_tensor")

    def __init__(self, name: str, shape: tuple[int, ...], dtype, shape_tensor: bool):
        self._name, self._shape, self._dtype, self._shape_tensor = name, tuple(shape), dtype, shape_tensor

    name = property(lambda self: self._name)
    shape = property(lambda self: Dims(self._shape))
    dtype = property(lambda self: self._dtype)
    is_shape_tensor = property(lambda self: self._shape_tensor)


class INetworkDefinition:
    __slots__ = ("_flags", "_strongly_typed", "_model", "_inputs", "_outputs", "_path")

    def __init__(self, flags: int, strongly_typed: bool):
        self._flags, self._strongly_typed = flags, strongly_typed
        self._model, self._inputs, self._outputs, self._path = None, [], [], None

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))
    num_layers = property(lambda self: len(self._model.graph.node) if self._model is not None else 0)

    def get_input(self, index):
        return self._inputs[index] if 0 <= index < len(self._inputs) else None

    def get_output(self, index):
        return self._outputs[index] if 0 <= index < len(self._outputs) else None


class ParserError:
    __slots__ = ("_code", "_desc", "_node", "_node_name", "_node_operator")

    def __init__(self, code, desc: str, node: int = -1, node_name: str = "", node_operator: str = ""):
        self._code, self._desc, self._node = code, desc, node
        self._node_name, self._node_operator = node_name, node_operator

    def code(self):
        return self._code

    def desc(self):
        return self._desc

    def node(self):
        return self._node

    def node_name(self):
        return self._node_name

    def node_operator(self):
        return self._node_operator

    def __str__(self) -> str:
        return f"In node {self._node} with name: {self._node_name} and operator: {self._node_operator} ({self._desc})"


class OnnxParser:
    __slots__ = ("_network", "_logger", "_errors")

    def __init__(self, network, logger):
        if not isinstance(network, INetworkDefinition):
            raise TypeError("OnnxParser(network, logger): network must be an INetworkDefinition")
        self._network, self._logger, self._errors = network, logger, []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index):
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self):
        self._errors.clear()

    def _error(self, code: str, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
        self._errors.append(self._env.trt.ParserError(getattr(self._env.trt.ErrorCode, code), desc, node, name, op))
        self._env.report(self._logger, "ERROR", f"ModelImporter: {desc} (node {node} {name!r}, op {op!r})")

    def parse_from_file(self, model):
        import onnx

        path = Path(os.fspath(model))
        try:
            proto = onnx.load(str(path), load_external_data=True)  # external data resolves beside the file
        except Exception as err:  # any failure to read is the parser's deserialisation error
            self._error("MODEL_DESERIALIZE_FAILED", f"Failed to parse ONNX model from file {path}: {err}")
            return False
        return self._import(proto, str(path))

    def parse(self, model, path=None):
        """``parse(model: buffer, path: str = None)``: a serialised model; external weights resolve beside ``path``."""
        import onnx
        from onnx.external_data_helper import load_external_data_for_model

        try:
            proto = onnx.load_model_from_string(bytes(model))
            if path is not None:
                load_external_data_for_model(proto, str(Path(os.fspath(path)).parent))
        except Exception as err:
            self._error("MODEL_DESERIALIZE_FAILED", f"Failed to parse ONNX model: {err}")
            return False
        return self._import(proto, None if path is None else os.fspath(path))

    def _import(self, proto, path: str | None) -> bool:
        """Check the model as the real importer would, and fill the network on success."""
        env = self._env
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if env.major < 11 and not 9 <= opset <= 20:
            self._error("UNSUPPORTED_GRAPH", f"opset {opset} is outside the range TensorRT {env.version} parses (9-20)")
        for index, node in enumerate(proto.graph.node):
            if node.domain not in ("", "ai.onnx"):
                self._error(
                    "UNSUPPORTED_NODE",
                    f"No importer registered for op: {node.op_type} ({node.domain})",
                    index,
                    node.name,
                    node.op_type,
                )
            elif node.op_type in UNSUPPORTED_OPS:
                self._error(
                    "UNSUPPORTED_NODE", f"No importer registered for op: {node.op_type}", index, node.name, node.op_type
                )
        shape_fed = {
            node.input[i]
            for node in proto.graph.node
            for i in SHAPE_OPERANDS.get(node.op_type, ())
            if i < len(node.input)
        }
        initializers = {init.name for init in proto.graph.initializer}
        inputs, outputs = [], []
        for values, out in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
            for value in values:
                if value.name in initializers:
                    continue
                tensor_type = value.type.tensor_type
                dtype = ONNX_TO_TRT.get(tensor_type.elem_type)
                if dtype is None:
                    self._error("UNSUPPORTED_GRAPH", f"tensor {value.name} has an ONNX type TensorRT cannot bind")
                    continue
                shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
                is_shape = out is inputs and value.name in shape_fed and len(shape) <= 1 and dtype in ("INT32", "INT64")
                out.append(self._env.trt.ITensor(value.name, shape, getattr(env.trt.DataType, dtype), is_shape))
        if self._errors:
            return False
        net = self._network
        net._model, net._inputs, net._outputs, net._path = proto, inputs, outputs, path
        return True


class IOptimizationProfile:
    __slots__ = ("_shapes",)

    def __init__(self):
        self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input, min, opt, max):
        dims = [tuple(int(d) for d in s) for s in (min, opt, max)]
        for which, shape in zip(("min", "opt", "max"), dims, strict=True):
            earlier = dims[: ("min", "opt", "max").index(which)]
            bad = (
                any(d < 0 for d in shape)
                or any(len(e) != len(shape) for e in earlier)
                or any(any(a > b for a, b in zip(e, shape, strict=True)) for e in earlier)
            )
            if bad:
                raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")
        self._shapes[str(input)] = tuple(dims)

    def get_shape(self, input):
        return [Dims(s) for s in self._shapes.get(str(input), ())]

    def __bool__(self) -> bool:
        return bool(self._shapes)


class ITimingCache:
    __slots__ = ("_entries", "_origin")

    def __init__(self, origin: tuple[str, str], entries: dict):
        self._origin, self._entries = origin, dict(entries)

    def serialize(self):
        return IHostMemory(pack_timing_cache(*self._origin, self._entries))


class IBuilderConfig:
    __slots__ = (
        "_pools",
        "_level",
        "_cache",
        "_verbosity",
        "_flags",
        "_profiles",
        "_device_type",
        "_dla_core",
        "_compat",
        "_monitor",
        "_logger",
    )

    def __init__(self, logger):
        trt = self._env.trt
        self._logger, self._pools, self._level, self._cache = logger, {}, 3, None
        self._verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
        self._flags = {trt.BuilderFlag.TF32}  # TF32 is on by default
        self._profiles: list[IOptimizationProfile] = []
        self._device_type, self._dla_core = trt.DeviceType.GPU, -1
        self._compat, self._monitor = trt.HardwareCompatibilityLevel.NONE, None

    def set_memory_pool_limit(self, pool, pool_size):
        self._pools[pool] = int(pool_size)

    def get_memory_pool_limit(self, pool):
        return self._pools.get(pool, self._env.cuda.total_memory)

    def set_flag(self, flag):
        self._flags.add(self._env.trt.BuilderFlag(flag))

    def clear_flag(self, flag):
        self._flags.discard(self._env.trt.BuilderFlag(flag))

    def get_flag(self, flag):
        return self._env.trt.BuilderFlag(flag) in self._flags

    def add_optimization_profile(self, profile):
        if not isinstance(profile, IOptimizationProfile) or not profile:
            self._env.report(self._logger, "ERROR", "addOptimizationProfile: the profile is not valid")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    num_optimization_profiles = property(lambda self: len(self._profiles))

    def create_timing_cache(self, serialized_timing_cache):
        env, data = self._env, bytes(serialized_timing_cache)
        if not data:
            return env.trt.ITimingCache((env.version, env.compute_capability), {})
        blob = unpack_timing_cache(data)
        if blob is None:
            env.report(self._logger, "ERROR", "createTimingCache: the serialized timing cache is corrupted")
            return None
        return env.trt.ITimingCache((blob["tensorrt_version"], blob["compute_capability"]), blob["entries"])

    def set_timing_cache(self, cache, ignore_mismatch):
        env = self._env
        if cache._origin != (env.version, env.compute_capability) and not ignore_mismatch:
            env.report(
                self._logger,
                "ERROR",
                f"setTimingCache: the cache was made by TensorRT {cache._origin[0]} "
                f"on compute {cache._origin[1]}; this is {env.version} on "
                f"{env.compute_capability}",
            )
            return False
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache

    def _property(slot: str, kind: str | None = None):  # a class-body helper
        def set_(self, value):
            if kind is not None and value is not None and not isinstance(value, getattr(self._env.trt, kind)):
                raise TypeError(f"expected trt.{kind}, got {value!r}")
            object.__setattr__(self, slot, value)

        return property(lambda self: getattr(self, slot), set_)

    builder_optimization_level = _property("_level")
    profiling_verbosity = _property("_verbosity", "ProfilingVerbosity")
    default_device_type = _property("_device_type", "DeviceType")
    DLA_core = _property("_dla_core")
    hardware_compatibility_level = _property("_compat", "HardwareCompatibilityLevel")
    progress_monitor = _property("_monitor", "IProgressMonitor")
    del _property


class Builder:
    __slots__ = ("_logger",)

    def __init__(self, logger):
        self._logger = logger

    num_DLA_cores = property(lambda self: self._env.num_dla_cores)

    def create_network(self, flags=0):
        env, flags = self._env, int(flags)
        known = sum(1 << int(member) for member in env.trt.NetworkDefinitionCreationFlag)
        if flags & ~known:
            env.report(self._logger, "ERROR", f"createNetworkV2: invalid flags 0x{flags:x}")
            return None
        strongly = env.major >= 11 or bool(flags >> int(env.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) & 1)
        return env.trt.INetworkDefinition(flags, strongly)

    def create_builder_config(self):
        return self._env.trt.IBuilderConfig(self._logger)

    def create_optimization_profile(self):
        return self._env.trt.IOptimizationProfile()

    def _fail(self, message: str) -> None:
        self._env.report(self._logger, "ERROR", f"IBuilder::buildSerializedNetwork: {message}")

    def build_serialized_network(self, network, config):
        from tests.fakes.numerics import runnable
        from tests.fakes.trt_runtime import ort_session

        env, trt = self._env, self._env.trt
        if network._model is None:
            return self._fail("the network is empty (was the ONNX parsed?)")
        if not 0 <= int(config._level) <= 5:
            return self._fail(f"builder_optimization_level {config._level} is outside 0..5")
        dla = config._device_type == trt.DeviceType.DLA
        if dla and not 0 <= config._dla_core < env.num_dla_cores:
            return self._fail(f"DLA core {config._dla_core} requested; this device has {env.num_dla_cores}")
        inputs = {t.name: t for t in network._inputs}
        dynamic = [t.name for t in network._inputs if -1 in t._shape]
        if dynamic and not config._profiles:
            return self._fail(f"network has dynamic inputs {dynamic} but no optimization profile")
        for index, profile in enumerate(config._profiles):
            for name in profile._shapes:
                if name not in inputs:
                    return self._fail(f"optimization profile {index} names {name!r}, not a network input")
            for name, tensor in inputs.items():
                if tensor.is_shape_tensor:
                    return self._fail(f"optimization profile {index} is missing values for shape input {name}")
                if name not in profile._shapes:
                    if -1 in tensor._shape:
                        return self._fail(f"optimization profile {index} has no shape for dynamic input {name}")
                    continue
                for shape in profile._shapes[name]:
                    if len(shape) != len(tensor._shape) or any(
                        n != -1 and n != d for n, d in zip(tensor._shape, shape, strict=True)
                    ):
                        return self._fail(
                            f"profile {index}: {name} shape {shape} does not fit the network's {tensor._shape}"
                        )
        workspace = config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)
        gemm = next((n for n in network._model.graph.node if n.op_type in TACTIC_LAYERS), None)
        if gemm is not None and workspace < MIN_TACTIC_WORKSPACE:
            env.report(
                self._logger,
                "WARNING",
                f"Tactic Device request: {MIN_TACTIC_WORKSPACE >> 20}MB Available: {workspace / 2**20:g}MB. "
                "Device memory is insufficient to use tactic.",
            )
            return self._fail(f"Error Code 10: Internal Error (Could not find any implementation for node {gemm.name})")
        monitor = config._monitor
        if monitor is not None:
            IProgressMonitor._check_initialised(monitor, "IProgressMonitor")
            monitor.phase_start("Building engine", None, len(config._profiles))
        onnx_bytes = network._model.SerializeToString()
        session = ort_session(runnable(onnx_bytes))
        profiles = []
        for index, profile in enumerate(config._profiles):
            shapes = {name: [list(s) for s in profile._shapes.get(name, (t._shape,) * 3)] for name, t in inputs.items()}
            outputs = output_shapes(session, {name: (s[1], inputs[name].dtype.name) for name, s in shapes.items()})
            nbytes = sum(int(np.prod(s[2])) * 8 for s in shapes.values()) + sum(
                int(np.prod(s)) * 4 for s in outputs.values()
            )
            profiles.append({"shapes": shapes, "outputs": outputs, "device_memory": -(-nbytes // 256) * 256 + 65536})
            if monitor is not None and not monitor.step_complete("Building engine", index):
                monitor.phase_finish("Building engine")
                return self._fail("the build was cancelled by the progress monitor")
        if monitor is not None:
            monitor.phase_finish("Building engine")
        if config._cache is not None:
            config._cache._entries[hashlib.sha256(onnx_bytes).hexdigest()] = len(profiles)
        header = {
            "tensorrt_version": env.version,
            "device": {"name": env.cuda.name, "compute_capability": env.compute_capability},
            "strongly_typed": network._strongly_typed,
            "flags": sorted(f.name for f in config._flags),
            "hardware_compatibility_level": config._compat.name,
            "device_type": config._device_type.name,
            "dla_core": config._dla_core if dla else -1,
            "profiling_verbosity": config._verbosity.name,
            "builder_optimization_level": int(config._level),
            "memory_pools": {pool.name: size for pool, size in config._pools.items()},  # bytes, as set
            "inputs": [{"name": t.name, "dtype": t.dtype.name, "shape": list(t._shape)} for t in network._inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype.name, "shape": list(t._shape)} for t in network._outputs],
            "profiles": profiles,
            "layers": [
                {"name": n.name or f"node_{i}", "op": n.op_type} for i, n in enumerate(network._model.graph.node)
            ],
        }
        return IHostMemory(pack_plan(header, onnx_bytes))


# The WORKSPACE pool (bytes) caps the scratch any one layer's tactic may use ("If an insufficient scratch is
# provided, TensorRT may not be able to find an implementation for a given layer", developer guide). The fake
# gives every GEMM/convolution's cheapest tactic 1 MiB [*: the size is this fake's choice, not NVIDIA's]: a
# limit given in MiB where bytes are due (64 for 64 MiB) leaves no tactic, as on a GPU.
TACTIC_LAYERS = ("MatMul", "Gemm", "Conv")
MIN_TACTIC_WORKSPACE = 1 << 20


def output_shapes(session, inputs: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, list[int]]:
    """Output shapes for inputs {name: (shape, TensorRT dtype name)}: ONNX Runtime runs the graph once on zeros."""
    from tests.fakes.trt_runtime import NUMPY

    feeds = {name: np.zeros(shape, NUMPY[dtype]) for name, (shape, dtype) in inputs.items()}
    results = session.run(None, feeds)
    return {meta.name: list(value.shape) for meta, value in zip(session.get_outputs(), results, strict=True)}


PUBLIC = [
    ITensor,
    INetworkDefinition,
    ParserError,
    OnnxParser,
    IOptimizationProfile,
    ITimingCache,
    IBuilderConfig,
    Builder,
]
