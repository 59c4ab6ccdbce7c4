"""TensorRT backend: the bundle's engines driven through cuda-python, state on the device.

``TrtBackend`` loads ``BUNDLE/engines/*.plan`` after checking ``engines/build.json`` against the
running TensorRT and GPU, and hands out ``TrtSession``s (``runtime.backends.base.Session``). A
session owns every per-generation tensor in device memory: the KV cache, the conditioning, logits,
f̂ (two buffers, read one / write the other), the folded input, tokens and indices. Only the
labels, sampling parameters and uniform noise go up (one copy from pinned memory); only indices
and images come down (into pinned memory).

Each (graph, batch, scale) has its own optimization profile with fixed shapes; each session has its
own execution context per profile it uses, all contexts sharing one scratch allocation (they run one
after another on one stream). With ``use_cuda_graphs`` a session runs its first generation eagerly
and captures its second whole — upload, prefill, every scale's step, sample and fold with their
device copies, decode, download — as one CUDA graph, which every later generation replays: one
pack on the host, one launch, one synchronise per generation (see ``TrtSession``).

No torch. TensorRT objects are named ``trt_*`` so ``tests/test_trt_api_names.py`` can check every
call against the TensorRT 10.3 and 11.4 API listings.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from imagefolder.core import cuda
from imagefolder.core.bundle import Bundle, load_bundle
from imagefolder.core.engines import (
    ENGINE_DIR,
    REBUILD_HINT,
    EngineMismatch,
    check_build_record,
    import_tensorrt,
    read_build_record,
)
from imagefolder.core.schedule import cfg_rows, positions
from imagefolder.core.specs import cache_input_names
from imagefolder.errors import EngineError, InputError
from imagefolder.io import atomic_write_text, sha256_file
from imagefolder.runtime.backends.base import BatchRequest, BundleFacts, Stage, no_stage, run_stages

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Engine


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


# ---------------------------------------------------------------------------------------------------------------------
# Backend


def _bundle(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=False)


class TrtBackend(BundleFacts):
    """Runs a bundle's TensorRT engines; see ``runtime.backends.base.Backend``.

    Args:
        bundle: a loaded ``Bundle`` or its folder; ``BUNDLE/engines`` must hold plans built here.
        use_cuda_graphs: sessions capture their whole generation as one CUDA graph at their second
            generation and replay it after (``TrtSession``); False: every generation runs eagerly.
        layer_profile: attach an ``IProfiler`` to every context (per-layer times, see ``layer_times``);
            it synchronises every enqueue, so CUDA graphs are off and step times are not representative.
        graphs: engines to load (default: every engine in the build record).
    """

    name = "trt"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        use_cuda_graphs: bool = True,
        layer_profile: bool = False,
        graphs: list[str] | None = None,
    ):
        self.bundle = _bundle(bundle)
        self.trt = trt = import_tensorrt()
        self.use_cuda_graphs = use_cuda_graphs and not layer_profile
        self.layer_profile = layer_profile
        record = read_build_record(self.bundle.path)
        self.gpu = cuda.device_properties()
        check_build_record(record, trt.__version__, self.gpu, self.bundle.manifest)
        self.record = record
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.logger)
        if record.get("flags", {}).get("version_compat"):
            # Version-compatible plans embed a lean runtime that the loading process must allow to run.
            self.trt_runtime.engine_host_code_allowed = True
        self.stream = cuda.Stream()
        self.engines: dict[str, Engine] = {}
        self.scratch: cuda.DeviceBuffer | None = None
        self._sessions: list[TrtSession] = []
        names = list(record["graphs"]) if graphs is None else list(graphs)
        try:
            for graph in names:
                if graph not in record["graphs"]:
                    raise EngineMismatch(f"no {graph} engine in {self.bundle.path / ENGINE_DIR}; {REBUILD_HINT}")
                entry = record["graphs"][graph]
                engine = Engine(trt, self.trt_runtime, graph, self.bundle.path / entry["file"], entry, layer_profile)
                self.engines[graph] = engine.load()
                engine.check_io(self._tensors(graph))
            # One scratch for every context: stages run one after another on one stream.
            size = max((e.scratch_size() for e in self.engines.values()), default=0)
            self.scratch = cuda.DeviceBuffer(size)
            for engine in self.engines.values():
                engine.activate(self.scratch)
        except BaseException:
            self.close()
            raise
        log.info("TensorRT %s: loaded %s, scratch %.1f MiB", trt.__version__, ", ".join(self.engines), size / 2**20)

    # -- helpers -------------------------------------------------------------------------------------------------------

    def _tensors(self, graph: str) -> dict[str, dict]:
        entry = self.bundle.manifest["graphs"][graph]
        out = {t["name"]: {**t, "is_input": True} for t in entry["inputs"]}
        out.update({t["name"]: {**t, "is_input": False} for t in entry["outputs"]})
        return out

    def engine(self, graph: str) -> Engine:
        if graph not in self.engines:
            raise KeyError(f"the {graph} engine is not loaded (loaded: {', '.join(self.engines)})")
        return self.engines[graph]

    def context(self, graph: str, batch: int, scale_index: int | None = None, own: bool = False) -> ExecutionContext:
        """The execution context of (graph, batch, scale): the engine's shared one, or a new one if ``own``."""
        engine = self.engine(graph)
        profile = engine.profile_for(batch, scale_index)
        return engine.new_context(profile, self.stream) if own else engine.context(profile, self.stream)

    # -- Backend protocol ----------------------------------------------------------------------------------------------

    def session(self, batch: int) -> TrtSession:
        if not 1 <= batch <= self.bundle.batch_max:
            raise InputError(f"batch {batch} is outside 1..{self.bundle.batch_max} (the bundle's batch_max)")
        session = TrtSession(self, batch)
        self._sessions.append(session)
        return session

    def run_graph(
        self, graph: str, inputs: dict[str, np.ndarray], batch: int, scale_index: int | None = None
    ) -> dict[str, np.ndarray]:
        """Run one engine on host arrays with the profile of (batch, scale) and return its outputs.

        For checks and single-shot use (encode, decode); the generation loop keeps everything on the device.
        """
        tensors = self._tensors(graph)
        context = self.context(graph, batch, scale_index)
        shapes = self.bundle.shapes(graph, batch, scale_index or 0)
        arrays = {name: cuda.DeviceArray(shapes[name], tensors[name]["dtype"]) for name in tensors}
        try:
            for name, value in inputs.items():
                arrays[name].upload(np.asarray(value, dtype=arrays[name].dtype), self.stream)
            context.bind({name: array.ptr for name, array in arrays.items()})
            context.execute(self.stream)
            return {name: arrays[name].download(self.stream) for name in tensors if not tensors[name]["is_input"]}
        finally:
            self.stream.synchronize()
            for array in arrays.values():
                array.free()

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.run_graph("encoder", {"image": images}, int(images.shape[0]))["indices"]

    def decode(self, indices: np.ndarray) -> np.ndarray:
        return self.run_graph("decoder", {"indices": indices}, int(indices.shape[0]))["image"]

    # -- profiling -----------------------------------------------------------------------------------------------------

    def layer_times(self) -> dict[str, dict[str, list[float]]]:
        """graph → layer → milliseconds of every run since the backend was made (``layer_profile=True``)."""
        return {name: dict(engine.layer_times) for name, engine in self.engines.items()}

    def inspect(self, out_dir: str | Path) -> list[Path]:
        """Write the engine inspector's JSON of every engine to ``out_dir/<graph>.engine.json``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, engine in self.engines.items():
            paths.append(atomic_write_text(out_dir / f"{name}.engine.json", engine.inspect()))
        return paths

    def close(self) -> None:
        """Release sessions, contexts, engines, scratch and stream, in that order."""
        for session in list(self._sessions):
            session.close()
        self._sessions.clear()
        if getattr(self, "stream", None) is not None and self.stream.handle is not None:
            self.stream.synchronize()
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
        if self.scratch is not None:
            self.scratch.free()
            self.scratch = None
        if getattr(self, "stream", None) is not None:
            self.stream.destroy()

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# Session


ALIGNMENT = 256  # TensorRT wants every tensor address 256-byte aligned


class RequestLayout:
    """Where every per-image input of one generation lies in one buffer, each segment 256-byte aligned.

    Segments: ``labels`` (the N CFG rows), ``uniforms[si]`` (B, q, branches) and ``guidance[si]`` (B,)
    per scale, ``top_k`` and ``top_p`` (B,). The host packs a request into pinned memory with this
    layout and one copy moves it to the device, where each engine reads its segment in place.
    """

    def __init__(self, batch: int, spans: list[tuple[int, int]], branches: int):
        self.batch, self.spans, self.branches = batch, spans, branches
        self.segments: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self.nbytes = 0
        self._add("labels", np.int64, (2 * batch,))
        for si, (_, q) in enumerate(spans):
            self._add(f"uniforms[{si}]", np.float32, (batch, q, branches))
            self._add(f"guidance[{si}]", np.float32, (batch,))
        self._add("top_k", np.int64, (batch,))
        self._add("top_p", np.float32, (batch,))

    def _add(self, name: str, dtype, shape: tuple[int, ...]) -> None:
        self.nbytes += -self.nbytes % ALIGNMENT
        self.segments[name] = (self.nbytes, np.dtype(dtype), shape)
        self.nbytes += int(np.prod(shape)) * np.dtype(dtype).itemsize

    def offset(self, name: str) -> int:
        return self.segments[name][0]

    def pack(self, request: BatchRequest, null_class: int, host: np.ndarray) -> None:
        """Write ``request`` into the uint8 array ``host`` (at least ``nbytes`` long) in this layout."""
        values = {"labels": cfg_rows(request.labels, null_class), "top_k": request.top_k, "top_p": request.top_p}
        for si, (start, q) in enumerate(self.spans):
            values[f"uniforms[{si}]"] = request.uniforms[:, start : start + q]
            values[f"guidance[{si}]"] = request.guidance[si]
        for name, (offset, dtype, shape) in self.segments.items():
            size = int(np.prod(shape)) * dtype.itemsize
            host[offset : offset + size].view(dtype).reshape(shape)[...] = values[name]


class TrtSession:
    """One batch size's generation state in device memory; see ``base.Session`` and ``base.GraphSession``.

    Every buffer is allocated once, here, and freed only by ``close``: the request (pinned staging on
    the host and one device buffer), the KV cache, conditioning, logits, new keys/values, folded
    input, f̂ (two), tokens, indices, image, and the pinned staging of the outputs. The session owns
    its execution contexts too, each bound once to these buffers. So every kernel argument and every
    copy address of a generation is the same each time, and the whole generation is one CUDA graph:

    - generation 0 runs eagerly, stage by stage (TensorRT's first enqueue on a context does set-up
      work that no capture may contain; it also gives per-stage CUDA-event times);
    - the next generation with ``use_graph`` is captured — the upload from the pinned staging, every
      stage with its device copies, the download into pinned memory — and launched;
    - every later generation replays it: the host packs the request into the staging buffer, launches
      once, synchronises once, and copies the outputs out of their pinned staging.

    The graph is keyed by the session's addresses (``graph_key``: every binding of every stage, the
    request and output buffers): a graph replays the addresses it captured, so they must never change
    while it lives. They cannot: no buffer is reallocated, ``close`` destroys the graph before it
    frees the buffers, and no other session binds these contexts. A capture that fails (TensorRT or
    CUDA refusing any part of it) leaves the session eager, with one warning; it never fails a request.
    """

    def __init__(self, backend: TrtBackend, batch: int):
        self.backend, self.batch = backend, batch
        bundle = backend.bundle
        self.scales = bundle.scales
        self.spans = bundle.spans
        self.num_scales = len(self.scales)
        self.nb = bundle.num_branches
        self.null_class = bundle.num_classes
        self.use_graph = backend.use_cuda_graphs
        self.graph: cuda.CudaGraph | None = None
        self.capture_failed = False
        self.generations = 0
        self.timer = cuda.EventTimer(backend.stream)
        self.layout = RequestLayout(batch, self.spans, self.nb)
        self._arrays: list[cuda.DeviceArray] = []
        self._pinned: list[cuda.PinnedHostBuffer] = []
        self.contexts: dict[tuple[str, int | None], ExecutionContext] = {}
        self._sent = self._received = self._launches = 0
        self.closed = False
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    # -- allocation ----------------------------------------------------------------------------------------------------

    def _shape(self, graph: str, name: str, si: int = 0) -> tuple[int, ...]:
        return self.backend.bundle.shapes(graph, self.batch, si)[name]

    def _dtype(self, graph: str, name: str) -> np.dtype:
        return np.dtype(self.backend.bundle.tensor_dtype(graph, name))

    def _array(self, shape, dtype) -> cuda.DeviceArray:
        array = cuda.DeviceArray(shape, dtype)
        self._arrays.append(array)
        return array

    def _shared(self, uses: list[tuple[str, str, int]]) -> cuda.DeviceBuffer:
        """One buffer large enough for every (graph, tensor, scale) in ``uses``; views give each its shape."""
        nbytes = max(int(np.prod(self._shape(g, n, si))) * self._dtype(g, n).itemsize for g, n, si in uses)
        array = self._array((nbytes,), np.uint8)
        return array.buffer

    def _pinned_buffer(self, nbytes: int) -> cuda.PinnedHostBuffer:
        buffer = cuda.PinnedHostBuffer(nbytes)
        self._pinned.append(buffer)
        return buffer

    def _allocate(self) -> None:
        stream, sn = self.backend.stream, self.num_scales
        scales, folds = range(sn), range(max(sn - 1, 1))

        def own(graph: str, name: str, si: int = 0) -> cuda.DeviceArray:
            return self._array(self._shape(graph, name, si), self._dtype(graph, name))

        self.request = self._array((self.layout.nbytes,), np.uint8)
        self.request_host = self._pinned_buffer(self.layout.nbytes)
        self.cond = {name: own("ar_prefill", name) for name in ("cond_start", "cond_blocks", "cond_head")}
        # The cache: L layers of (N, Hd, P, D) in one buffer each for keys and values, every layer at an
        # aligned address (ar_step binds each as an input). Attention reads every position and masks the
        # unfilled ones by adding −inf to their scores and by weight 0 on their values: NaN left in fresh
        # device memory would survive both, hence the zeroing.
        self.cache_names = cache_input_names(self.backend.bundle.depth)
        n, heads, positions_total, head_dim = self._shape("ar_step", self.cache_names[0][0])
        self.cache_esize = self._dtype("ar_step", "keys").itemsize
        layer_bytes = n * heads * positions_total * head_dim * self.cache_esize
        self.cache_stride = layer_bytes + -layer_bytes % ALIGNMENT
        # (rows of a layer: N·Hd, bytes of a row: P·D, D)
        self.cache_rows = (n * heads, positions_total * head_dim * self.cache_esize, head_dim)
        self.cache_keys, self.cache_values = (
            self._array((len(self.cache_names[0]) * self.cache_stride,), np.uint8) for _ in range(2)
        )
        self.cache_keys.zero(stream)
        self.cache_values.zero(stream)
        # Logits: the step writes them, the sampler reads them; one buffer, a view per scale.
        self.logits_buffer = self._shared(
            [("ar_step", "logits", si) for si in scales] + [("sampler", "logits", si) for si in scales]
        )
        # This step's keys/values, copied into the cache after each step.
        self.new_keys = self._shared([("ar_step", "keys", si) for si in scales])
        self.new_values = self._shared([("ar_step", "values", si) for si in scales])
        # The folded input of the next step; zeros for scale 0, which reads the start token instead.
        self.x_next = self._shared([("fold", "x_next", si) for si in folds] + [("ar_step", "x_folded", 0)])
        cuda.DeviceArray((self.x_next.nbytes,), np.uint8, self.x_next).zero(stream)
        self.f_hat = [own("fold", "f_hat") for _ in range(2)]
        self.tokens = [own("sampler", "tokens", si) for si in scales]
        self.indices_dev, self.image = own("decoder", "indices"), own("decoder", "image")
        # The outputs' pinned staging: the image, then the indices at the next aligned offset.
        self._indices_offset = self.image.nbytes + -self.image.nbytes % ALIGNMENT
        self.outputs_host = self._pinned_buffer(self._indices_offset + self.indices_dev.nbytes)
        out = self.outputs_host.array
        self.images_host = out[: self.image.nbytes].view(self.image.dtype).reshape(self.image.shape)
        end = self._indices_offset + self.indices_dev.nbytes
        self.indices_host = out[self._indices_offset : end].view(self.indices_dev.dtype).reshape(self.indices_dev.shape)
        # Constant per-scale inputs, uploaded once: positions of each scale, the scale index.
        self.positions, self.scale_index = {}, {}
        pos_dtype = self._dtype("ar_step", "positions")
        for si in scales:
            scale_positions = positions(self.scales, si).astype(pos_dtype)
            self.positions[si] = self._array(scale_positions.shape, pos_dtype)
            self.positions[si].upload(scale_positions, stream)
            index = np.array([si], dtype=self._dtype("fold", "scale_index"))
            self.scale_index[si] = self._array(index.shape, index.dtype)
            self.scale_index[si].upload(index, stream)
        self.bindings = self._bindings(scales, folds)
        # This session's own execution contexts, one per profile it uses, each bound once to its buffers.
        graphs = {"prefill": "ar_prefill", "step": "ar_step", "sample": "sampler", "fold": "fold", "decode": "decoder"}
        for key, addresses in self.bindings.items():
            context = self.backend.context(graphs[key[0]], self.batch, key[1], own=True)
            context.bind(addresses)
            self.contexts[key] = context
        self.graph_key = tuple((key, tuple(sorted(a.items()))) for key, a in self.bindings.items()) + (
            ("request", self.request.ptr, self.request_host.ptr),
            ("outputs", self.outputs_host.ptr),
        )
        stream.synchronize()

    def _bindings(self, scales: range, folds: range) -> dict[tuple[str, int | None], dict[str, int]]:
        """(stage, scale) → the device address of every I/O tensor of its engine."""
        cond = {name: a.ptr for name, a in self.cond.items()}
        out: dict[tuple[str, int | None], dict[str, int]] = {
            ("prefill", None): {"labels": self._segment("labels"), **cond}
        }
        for si in scales:
            out["step", si] = {
                "x_folded": self.x_next.ptr,
                "positions": self.positions[si].ptr,
                **cond,
                **self._cache_layers(self.cache_names[0], self.cache_keys),
                **self._cache_layers(self.cache_names[1], self.cache_values),
                "logits": self.logits_buffer.ptr,
                "keys": self.new_keys.ptr,
                "values": self.new_values.ptr,
            }
            out["sample", si] = {
                "logits": self.logits_buffer.ptr,
                "guidance": self._segment(f"guidance[{si}]"),
                "top_k": self._segment("top_k"),
                "top_p": self._segment("top_p"),
                "uniforms": self._segment(f"uniforms[{si}]"),
                "tokens": self.tokens[si].ptr,
            }
        for si in folds:
            out["fold", si] = {
                "tokens": self.tokens[si].ptr,
                "f_hat": self.f_hat[si % 2].ptr,
                "scale_index": self.scale_index[si].ptr,
                "next_positions": self.positions[si + 1].ptr,
                "f_hat_out": self.f_hat[(si + 1) % 2].ptr,
                "x_next": self.x_next.ptr,
            }
        out["decode", None] = {"indices": self.indices_dev.ptr, "image": self.image.ptr}
        return out

    def _cache_layers(self, names: list[str], cache: cuda.DeviceArray) -> dict[str, int]:
        """The address of each layer's (N, Hd, P, D) slice of ``cache``, by its ``ar_step`` input name."""
        return {name: cache.ptr + layer * self.cache_stride for layer, name in enumerate(names)}

    def _segment(self, name: str) -> int:
        """The device address of one segment of the request buffer."""
        return self.request.ptr + self.layout.offset(name)

    # -- device copies -------------------------------------------------------------------------------------------------

    def _append_cache(self, si: int) -> None:
        """Copy this scale's keys/values (L, N, H, q, D) into the cache's layers (N, H, P, D) at its positions.

        One 2-D copy of all L·N·H rows when the layers lie back to back (every official preset), else
        one per layer (a layer's size is not a multiple of the address alignment).
        """
        start, q = self.spans[si]
        rows, row, head_dim = self.cache_rows
        depth, width = len(self.cache_names[0]), q * head_dim * self.cache_esize
        copies = (
            [(0, 0, depth * rows)]
            if self.cache_stride == rows * row  # the layers lie back to back
            else [(layer * self.cache_stride, layer * rows * width, rows) for layer in range(depth)]
        )
        for cache, new in ((self.cache_keys, self.new_keys), (self.cache_values, self.new_values)):
            for cache_offset, new_offset, count in copies:
                cuda.memcpy2d_dtod_async(
                    cache.ptr + cache_offset + start * head_dim * self.cache_esize,
                    row,
                    new.ptr + new_offset,
                    width,
                    width,
                    count,
                    self.backend.stream,
                )

    def _scatter_tokens(self, si: int) -> None:
        """tokens (B, q, nb) of one scale → indices (B, nb, P) at the scale's positions."""
        start, q = self.spans[si]
        esize, positions = self.tokens[si].dtype.itemsize, self.indices_dev.shape[2]
        for b in range(self.batch):
            for branch in range(self.nb):
                cuda.memcpy2d_dtod_async(
                    self.indices_dev.ptr + ((b * self.nb + branch) * positions + start) * esize,
                    esize,
                    self.tokens[si].ptr + (b * q * self.nb + branch) * esize,
                    self.nb * esize,
                    esize,
                    q,
                    self.backend.stream,
                )

    # -- Session protocol ----------------------------------------------------------------------------------------------

    @property
    def device_timer(self) -> cuda.EventTimer:
        return self.timer

    @property
    def transferred(self) -> tuple[int, int]:
        """Bytes copied host → device and device → host by generations of this session."""
        return self._sent, self._received

    @property
    def launches(self) -> int:
        """Operations the host enqueued for this session's generations (copies, memsets, enqueues, graph launches)."""
        return self._launches

    def generate(self, request: BatchRequest, stage: Stage = no_stage) -> tuple[np.ndarray, np.ndarray]:
        if request.labels.shape != (self.batch,):
            raise InputError(f"a request of {request.labels.shape[0]} images for a session of {self.batch}")
        stream = self.backend.stream
        launches = stream.launches
        # Every generation ends with a synchronise (below, or on error): no copy still reads the staging.
        self.layout.pack(request, self.null_class, self.request_host.array)
        try:
            if self.graph is None and self.use_graph and self.generations and not self.capture_failed:
                self._capture()
            if self.graph is not None:
                with stage("generation"):
                    self.graph.launch(stream)
            else:
                run_stages(self, self.num_scales, stage)
            stream.synchronize()
        except BaseException:
            with contextlib.suppress(cuda.CudaError):
                stream.synchronize()
            raise
        self.generations += 1
        self._launches += stream.launches - launches
        self._sent += self.layout.nbytes
        self._received += self.image.nbytes + self.indices_dev.nbytes
        return self.images_host.copy(), self.indices_host.copy()

    def _capture(self) -> None:
        """Capture ``run_stages`` as one CUDA graph; if CUDA or TensorRT refuses, warn and stay eager."""
        stream = self.backend.stream
        graph = cuda.CudaGraph()
        try:
            graph.begin(stream)
            try:
                run_stages(self, self.num_scales)
                graph.end(stream)
            except BaseException:
                graph.abort(stream)
                raise
        except (cuda.CudaError, RuntimeError) as err:
            graph.destroy()
            self.capture_failed = True
            log.warning(
                "batch %d: capturing the generation as a CUDA graph failed (%s); it runs eagerly", self.batch, err
            )
            return
        self.graph = graph

    # -- the stages ----------------------------------------------------------------------------------------------------

    def _run(self, stage: str, si: int | None = None) -> None:
        self.contexts[stage, si].execute(self.backend.stream)

    def prefill(self) -> None:
        stream = self.backend.stream
        cuda.memcpy_async(self.request.ptr, self.request_host.ptr, self.layout.nbytes, "htod", stream)
        self.f_hat[0].zero(stream)  # fold(0) reads buffer 0; a reused session starts from an empty f̂
        self._run("prefill")

    def step(self, scale_index: int) -> None:
        self._run("step", scale_index)
        self._append_cache(scale_index)

    def sample(self, scale_index: int) -> None:
        self._run("sample", scale_index)
        self._scatter_tokens(scale_index)

    def fold(self, scale_index: int) -> None:
        self._run("fold", scale_index)

    def decode(self) -> None:
        stream = self.backend.stream
        self._run("decode")
        cuda.memcpy_async(self.outputs_host.ptr, self.image.ptr, self.image.nbytes, "dtoh", stream)
        host_indices = self.outputs_host.ptr + self._indices_offset
        cuda.memcpy_async(host_indices, self.indices_dev.ptr, self.indices_dev.nbytes, "dtoh", stream)

    def close(self) -> None:
        """Free the graph, events, contexts and buffers (after the stream is idle). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.backend.stream.synchronize()
        if self.graph is not None:
            self.graph.destroy()
            self.graph = None
        self.timer.destroy()
        self.contexts.clear()
        for array in self._arrays:
            array.free()
        self._arrays.clear()
        for pinned in self._pinned:
            pinned.free()
        self._pinned.clear()
        if self in self.backend._sessions:
            self.backend._sessions.remove(self)

    def __enter__(self) -> TrtSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
