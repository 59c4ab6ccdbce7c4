"""The TensorRT backend: loads the bundle's engines after checking the build record, hands out sessions.

``TrtBackend`` (``runtime.backends.base.Backend``) checks ``engines/build.json`` against the running TensorRT
and GPU, loads one ``Engine`` per graph, and gives each batch size a ``TrtSession`` that owns its state on the
device. No torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
from imagefolder.errors import InputError
from imagefolder.io import atomic_write_text
from imagefolder.runtime.backends.base import BundleFacts
from imagefolder.runtime.backends.trt.engine import Engine, ExecutionContext
from imagefolder.runtime.backends.trt.session import TrtSession

log = logging.getLogger(__name__)


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
        self.bundle.require_tensorrt()
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
