"""A strict fake of the TensorRT Python API subset imagefolder uses, for TensorRT 10.3 or 11.4.

``make_module(version, cuda)`` returns a module that stands in for ``tensorrt``: the builder side
(``trt_builder.py``: ``Builder``, ``OnnxParser``, ``IBuilderConfig``, profiles, timing caches) parses an
ONNX file with ``onnx`` and serialises a *plan*; the runtime side (``trt_runtime.py``: ``Runtime``,
``ICudaEngine``, ``IExecutionContext``) runs the plan's ONNX graph on ONNX Runtime's CPU provider,
reading and writing the tensors at their bound addresses in the fake CUDA device
(``cudart.py``), as a kernel enqueued on the stream.

Exposure is exact: every public name of the module and of its classes exists in the real bindings
of that version (``tests/test_fake_tensorrt.py`` checks them against
``tests/data/tensorrt-api``), objects refuse unknown attributes (pybind objects do), and the
version-specific members follow the listings and NVIDIA/TensorRT ``python/src/infer/pyCore.cpp``
(release/10.3 and release/11.1): 11.x has no ``EXPLICIT_BATCH`` and no ``FP16``/``BF16``/``INT8``
builder flags, keeps ``STRONGLY_TYPED`` (value 0, ignored: every network is strongly typed), and adds
``HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY``.

A plan is ``MAGIC + u32 header length + JSON header + ONNX bytes`` (external data inlined); the
header holds the TensorRT version, the device, the build flags, the I/O, and per profile the
min/opt/max input shapes, the output shapes and the activation memory size.

Numerics (``numerics.py``): engines compute what ONNX Runtime computes on the plan's graph, except that
bf16 graphs run in fp32 with their bf16 casts kept (ONNX Runtime's CPU provider has no bf16 kernels) and,
with ``installed(tf32_rounding=True)``, plans built with the TF32 flag round both operands of every fp32
matrix product to TF32. The WORKSPACE memory pool is recorded in the plan header in bytes as set, and a
limit under 1 MiB leaves GEMMs without a tactic (the build fails as TensorRT's does).

Not modelled: fp16 kernels beyond ONNX Runtime's own fp16 arithmetic, accumulation order, weak typing
on 10.x, tactics and their timing, the other memory pools, DLA placement beyond the build flags,
threads, and real time. tests/test_trt_gpu.py covers them on a GPU; tests/fakes/README.md lists what
the doubles do and do not model.
"""

from __future__ import annotations

import hashlib
import json
import struct
import types
from dataclasses import dataclass, field
from enum import IntEnum

from tests.fakes.cudart import FakeCuda

VERSIONS = ("10.3.0", "11.4.0")
MAGIC = b"IFFAKEPLAN\x00"
TIMING_MAGIC = b"IFFAKETIMING\x00"


@dataclass
class Env:
    """What one fake ``tensorrt`` module is bound to: its version, the fake GPU, and the log it writes."""

    version: str
    cuda: FakeCuda
    num_dla_cores: int = 0
    tf32_rounding: bool = False  # kernels of plans built with BuilderFlag.TF32 round products (numerics.py)
    log: list = field(default_factory=list)  # (severity name, message) of every message, whatever min_severity
    trt: types.ModuleType | None = None

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def compute_capability(self) -> str:
        return "{}.{}".format(*self.cuda.compute_capability)

    def report(self, logger, severity: str, message: str) -> None:
        """Log through the user's logger, as TensorRT does (and keep every message for the tests)."""
        self.log.append((severity, message))
        if logger is not None and type(logger).log is not self.trt.Logger.log:
            logger.log(getattr(self.trt.ILogger, severity), message)

    def errors(self) -> list[str]:
        return [message for severity, message in self.log if severity in ("ERROR", "INTERNAL_ERROR")]


class Dims:
    """``trt.Dims``: a sequence of ints (-1 for a dynamic dimension); compares equal to tuples and lists."""

    __slots__ = ("_dims",)

    def __init__(self, shape=()):
        self._dims = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, index):
        return self._dims[index]

    def __iter__(self):
        return iter(self._dims)

    def __eq__(self, other) -> bool:
        return isinstance(other, Dims | tuple | list) and tuple(other) == self._dims

    __hash__ = None

    def __repr__(self) -> str:
        return f"({', '.join(map(str, self._dims))})"


class IHostMemory(bytes):
    """Serialised data (a plan, a timing cache). The real one exposes the buffer protocol, as bytes does."""

    @property
    def nbytes(self) -> int:
        return len(self)


def _enum(name: str, members: list[str], values: list[int] | None = None) -> type[IntEnum]:
    values = values if values is not None else list(range(len(members)))
    enum = IntEnum(name, dict(zip(members, values, strict=True)))
    enum.__module__ = "tensorrt"
    return enum


def enums(major: int) -> dict[str, type[IntEnum]]:
    """The enums the fake exposes, with the members each version has (pyCore.cpp, release/10.3 and 11.1)."""
    flags = ["GPU_FALLBACK", "TF32", "VERSION_COMPATIBLE", "DISABLE_TIMING_CACHE", "REFIT", "STRIP_PLAN"]
    if major < 11:
        flags = ["FP16", "BF16", "INT8", "FP8"] + flags
        creation = _enum("NetworkDefinitionCreationFlag", ["EXPLICIT_BATCH", "STRONGLY_TYPED"])
        compat = _enum("HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS"])
    else:
        creation = _enum(
            "NetworkDefinitionCreationFlag",
            ["STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS", "PREFER_AOT_PYTHON_PLUGINS"],
        )
        compat = _enum("HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"])
    return {
        "DataType": _enum(
            "DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4"]
        ),
        "TensorIOMode": _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"]),
        "TensorLocation": _enum("TensorLocation", ["DEVICE", "HOST"]),
        "ExecutionContextAllocationStrategy": _enum(
            "ExecutionContextAllocationStrategy", ["STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"]
        ),
        "ProfilingVerbosity": _enum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"]),
        "LayerInformationFormat": _enum("LayerInformationFormat", ["ONELINE", "JSON"]),
        "MemoryPoolType": _enum(
            "MemoryPoolType",
            [
                "WORKSPACE",
                "DLA_MANAGED_SRAM",
                "DLA_LOCAL_DRAM",
                "DLA_GLOBAL_DRAM",
                "TACTIC_DRAM",
                "TACTIC_SHARED_MEMORY",
            ],
        ),
        "BuilderFlag": _enum("BuilderFlag", flags),
        "DeviceType": _enum("DeviceType", ["GPU", "DLA"]),
        "HardwareCompatibilityLevel": compat,
        "NetworkDefinitionCreationFlag": creation,
        "ErrorCode": _enum(
            "ErrorCode",
            ["SUCCESS", "INTERNAL_ERROR"]
            + ["MEM_ALLOC_FAILED"] * (major < 11)
            + [
                "MODEL_DESERIALIZE_FAILED",
                "INVALID_VALUE",
                "INVALID_GRAPH",
                "INVALID_NODE",
                "UNSUPPORTED_GRAPH",
                "UNSUPPORTED_NODE",
            ],
        ),  # the 11.4 listing has no MEM_ALLOC_FAILED
    }


SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


class ILogger:
    """``trt.ILogger``; the severities are exported into its scope, as pyCore.cpp does (``trt.Logger.WARNING``)."""

    def __init__(self):
        pass

    def log(self, severity, msg):
        raise RuntimeError('Tried to call pure virtual function "ILogger::log"')


class Logger(ILogger):
    """``trt.Logger(min_severity=WARNING)``: TensorRT's default logger (prints; here it records)."""

    def __init__(self, min_severity=None):
        super().__init__()
        self.min_severity = self.WARNING if min_severity is None else min_severity

    def log(self, severity, msg):
        pass  # Env.report already recorded it


class _Interface:
    """Base of the interfaces users subclass: pybind requires the base ``__init__`` to be called."""

    def __init__(self):
        self.__dict__["_trt_initialised"] = True

    @staticmethod
    def _check_initialised(obj, what: str) -> None:
        if not obj.__dict__.get("_trt_initialised"):
            raise TypeError(f"{type(obj).__name__}.__init__() must call {what}.__init__(self) (pybind11 requires it)")


class IProfiler(_Interface):
    def report_layer_time(self, layer_name, ms):
        raise RuntimeError('Tried to call pure virtual function "IProfiler::report_layer_time"')


class IProgressMonitor(_Interface):
    def phase_start(self, phase_name, parent_phase, num_steps):
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phase_start"')

    def step_complete(self, phase_name, step):
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::step_complete"')

    def phase_finish(self, phase_name):
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phase_finish"')


# ---------------------------------------------------------------------------------------------------------------------
# Plans and timing caches


def pack_plan(header: dict, onnx_bytes: bytes) -> bytes:
    header = dict(header, onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest())
    blob = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob + onnx_bytes


def unpack_plan(data: bytes) -> tuple[dict, bytes] | None:
    """(header, ONNX bytes), or None for bytes that are not an intact plan of this fake."""
    data = bytes(data)
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        return None
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + length])
    except ValueError:
        return None
    onnx_bytes = data[start + length :]
    if not isinstance(header, dict) or header.get("onnx_sha256") != hashlib.sha256(onnx_bytes).hexdigest():
        return None
    return header, onnx_bytes


def pack_timing_cache(version: str, compute_capability: str, entries: dict) -> bytes:
    blob = json.dumps({"tensorrt_version": version, "compute_capability": compute_capability, "entries": entries})
    return TIMING_MAGIC + blob.encode()


def unpack_timing_cache(data: bytes) -> dict | None:
    data = bytes(data)
    if not data.startswith(TIMING_MAGIC):
        return None
    try:
        return json.loads(data[len(TIMING_MAGIC) :])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# The module


def _bind(cls: type, env: Env) -> type:
    """A per-module subclass of ``cls`` carrying ``env``; slotted classes stay slotted (no stray attributes)."""
    namespace = {"_env": env, "__module__": "tensorrt", "__qualname__": cls.__name__}
    if "__slots__" in vars(cls):
        namespace["__slots__"] = ()
    return type(cls.__name__, (cls,), namespace)


def make_module(version: str, cuda: FakeCuda, num_dla_cores: int = 0, tf32_rounding: bool = False) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module of ``version`` ("10.3.0" or "11.4.0") running on ``cuda``."""
    from tests.fakes import trt_builder, trt_runtime

    if version not in VERSIONS:
        raise ValueError(f"the fake models TensorRT {VERSIONS}, not {version}")
    env = Env(version, cuda, num_dla_cores, tf32_rounding)
    module = types.ModuleType("tensorrt", f"fake TensorRT {version} (tests/fakes)")
    module.__version__ = version
    env.trt = module
    for name, enum in enums(env.major).items():
        setattr(module, name, enum)
    severity = _enum("Severity", list(SEVERITIES))
    logger_base = type(
        "ILogger", (ILogger,), {"Severity": severity, "__module__": "tensorrt", **{s.name: s for s in severity}}
    )
    module.ILogger = logger_base
    module.Logger = type("Logger", (Logger, logger_base), {"__module__": "tensorrt"})
    module.Dims = Dims
    module.IProfiler = type("IProfiler", (IProfiler,), {"__module__": "tensorrt"})
    module.IProgressMonitor = type("IProgressMonitor", (IProgressMonitor,), {"__module__": "tensorrt"})
    for cls in trt_builder.PUBLIC + trt_runtime.PUBLIC:
        setattr(module, cls.__name__, _bind(cls, env))
    module._env = env
    return module
