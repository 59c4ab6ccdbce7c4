"""ONNX Runtime backend: runs a bundle's ONNX graphs with any installed execution provider.

It is the portable backend (CPU everywhere; CUDA or TensorRT execution providers where the
onnxruntime build has them) and depends only on the manifest and the ONNX files. Every buffer of a
generation is a host numpy array allocated once per session: the KV cache (L, N, H, P, D) in the
bundle's state dtype, one logits buffer viewed per scale, the folded input, f̂ (two buffers, since a
graph must not read and write the same memory), tokens and indices. Each (graph, scale) gets an IO
binding to those buffers the first time it runs and reuses it, so a step allocates nothing large;
outputs are written in place and this scale's keys and values are copied into the cache at the
scale's positions. With a GPU provider ORT copies the bound host buffers to and from the device on
every call: that is the price of portability; the TensorRT backend keeps everything on the device.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

from imagefolder.core.bundle import Bundle, load_bundle
from imagefolder.core.schedule import cfg_rows, positions
from imagefolder.core.specs import cache_input_names
from imagefolder.errors import InputError
from imagefolder.runtime.backends.base import BatchRequest, BundleFacts, Stage, no_stage, run_stages

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OrtBackendError(InputError):
    """A request the ONNX Runtime backend cannot serve (provider, batch size, input shape)."""


def _provider_name(provider: str | tuple[str, dict]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def check_providers(providers: list | tuple | None) -> list:
    """Validate execution providers (names, or (name, options) pairs) against this onnxruntime build."""
    providers = list(DEFAULT_PROVIDERS if providers is None else providers)
    available = ort.get_available_providers()
    unknown = [_provider_name(p) for p in providers if _provider_name(p) not in available]
    if not providers or unknown:
        raise OrtBackendError(
            f"execution provider(s) {unknown or providers} not available in onnxruntime {ort.__version__}; "
            f"available: {', '.join(available)}"
        )
    return providers


class OrtBackend(BundleFacts):
    """Runs a bundle with ONNX Runtime: one ``InferenceSession`` per graph, created on first use.

    Args:
        bundle: a loaded ``Bundle`` or the path of a bundle folder (loaded and verified).
        providers: execution providers in order of preference (names or (name, options) pairs);
            default CPU only.
        threads: intra-op threads per graph session; default ONNX Runtime's choice (the physical cores).
        spin: let idle worker threads spin for work (ONNX Runtime's default). Off by default: the six
            graphs run one after another, each with its own thread pool, and threads spinning after
            their graph finished steal the cores from the next graph (measured in docs/benchmarks.md).
    """

    name = "ort"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        providers: list | tuple | None = None,
        threads: int | None = None,
        spin: bool = False,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.providers = check_providers(providers)
        self._options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise OrtBackendError(f"threads must be ≥ 1, got {threads}")
            self._options.intra_op_num_threads = threads
        for pool in ("intra_op", "inter_op"):
            self._options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spin else "0")
        self._graphs: dict[str, ort.InferenceSession] = {}

    def graph(self, name: str) -> ort.InferenceSession:
        """The ``InferenceSession`` of one graph, created the first time it is asked for."""
        if name not in self._graphs:
            path = self.bundle.graph_path(name)
            session = ort.InferenceSession(str(path), sess_options=self._options, providers=self.providers)
            wanted = [_provider_name(p) for p in self.providers]
            if session.get_providers()[0] != wanted[0]:
                log.warning("%s runs on %s, not on %s", path.name, session.get_providers()[0], wanted[0])
            self._graphs[name] = session
        return self._graphs[name]

    def check_batch(self, batch: int) -> None:
        if not 1 <= batch <= self.bundle.batch_max:
            raise OrtBackendError(
                f"batch {batch} is outside [1, {self.bundle.batch_max}] (the bundle's batch_max); "
                "split the request or re-export with a larger --batch-max"
            )

    def session(self, batch: int) -> OrtSession:
        """Allocate the buffers of a generation of ``batch`` images."""
        self.check_batch(batch)
        return OrtSession(self, batch)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """images (B, 3, H, W) float32 in [-1, 1] → indices (B, 2, P) int32."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._check_input("encoder", "image", images)
        return self.graph("encoder").run(["indices"], {"image": images})[0]

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """indices (B, 2, P) int32 → images (B, 3, H, W) float32 in [-1, 1]."""
        indices = np.ascontiguousarray(indices, dtype=np.int32)
        self._check_input("decoder", "indices", indices)
        return self.graph("decoder").run(["image"], {"indices": indices})[0]

    def _check_input(self, graph: str, name: str, array: np.ndarray) -> None:
        batch = array.shape[0] if array.ndim else 0
        self.check_batch(batch)
        want = self.bundle.shapes(graph, batch)[name]
        if array.shape != want:
            raise OrtBackendError(f"{graph}: {name} has shape {array.shape}, expected {want}")

    def close(self) -> None:
        self._graphs.clear()

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OrtSession:
    """The state of one generation of ``batch`` images in host buffers; see ``backends/base.py`` for the stages."""

    def __init__(self, backend: OrtBackend, batch: int):
        self.backend, self.batch = backend, batch
        bundle = backend.bundle
        self._spans = bundle.spans
        state = np.dtype(bundle.state_dtype)
        last = len(self._spans) - 1
        prefill = bundle.shapes("ar_prefill", batch)
        widest_step = bundle.shapes("ar_step", batch, last)  # the last scale has the most positions
        widest_fold = bundle.shapes("fold", batch, last)
        widest_sample = bundle.shapes("sampler", batch, last)
        positions_total = self._spans[-1][0] + self._spans[-1][1]

        self._labels = np.empty(prefill["labels"], np.int64)
        self._cond = {name: np.empty(prefill[name], state) for name in ("cond_start", "cond_blocks", "cond_head")}
        # The cache (L, N, Hd, P, D); ar_step binds each layer's contiguous slice as one of its inputs.
        self._cache_names = cache_input_names(bundle.depth)
        cache_shape = (bundle.depth, *widest_step[self._cache_names[0][0]])
        self._cache_keys = np.zeros(cache_shape, state)
        self._cache_values = np.zeros(cache_shape, state)
        # One flat buffer per per-scale tensor, viewed with the shape of each scale (a contiguous prefix).
        self._logits = np.empty(math.prod(widest_step["logits"]), np.float32)
        self._new_keys = np.empty(math.prod(widest_step["keys"]), state)
        self._new_values = np.empty(math.prod(widest_step["values"]), state)
        self._folded = np.zeros(math.prod(widest_fold["x_next"]), state)  # scale 0 reads zeros (ignored)
        self._tokens = np.empty(math.prod(widest_sample["tokens"]), np.int32)
        # The uniforms of all scales, scale after scale, each a contiguous (B, q, branches) block.
        self._uniforms = np.empty(batch * positions_total * bundle.num_branches, np.float32)
        # The reference tokens and force mask, laid out as the uniforms (conditioned generation).
        self._reference = np.zeros(self._uniforms.size, np.int32)
        self._force = np.zeros(self._uniforms.size, bool)
        self._guidance = np.empty((len(self._spans), batch), np.float32)
        self._top_k = np.empty(batch, np.int64)
        self._top_p = np.empty(batch, np.float32)
        self._f_hat = (np.zeros(widest_fold["f_hat"], state), np.zeros(widest_fold["f_hat"], state))
        self._indices = np.zeros(bundle.shapes("decoder", batch)["indices"], np.int32)
        self._image = np.empty(bundle.shapes("decoder", batch)["image"], np.float32)
        self._positions = [positions(bundle.scales, si) for si in range(len(self._spans))]
        self._scale_index = [np.array([si], np.int64) for si in range(len(self._spans))]
        self._bindings: dict[tuple[str, int], ort.IOBinding] = {}
        self._sent = self._received = 0

    @property
    def device_timer(self) -> None:
        return None

    @property
    def transferred(self) -> tuple[int, int]:
        """Bytes the session took in (the requests) and gave out (indices and images)."""
        return self._sent, self._received

    @property
    def launches(self) -> None:
        return None

    # -- buffers and bindings ----------------------------------------------------------------------

    def _shapes(self, graph: str, scale_index: int) -> dict[str, tuple[int, ...]]:
        return self.backend.bundle.shapes(graph, self.batch, scale_index)

    @staticmethod
    def _view(flat: np.ndarray, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return flat[offset : offset + math.prod(shape)].reshape(shape)

    def _buffers(self, graph: str, si: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The inputs and outputs of ``graph`` at scale ``si``, as views of the session's buffers."""
        s = self._shapes(graph, si)
        view = self._view
        if graph == "ar_prefill":
            return {"labels": self._labels}, dict(self._cond)
        if graph == "ar_step":
            return {
                "x_folded": view(self._folded, s["x_folded"]),
                "positions": self._positions[si],
                **self._cond,
                **dict(zip(self._cache_names[0], self._cache_keys, strict=True)),
                **dict(zip(self._cache_names[1], self._cache_values, strict=True)),
            }, {
                "logits": view(self._logits, s["logits"]),
                "keys": view(self._new_keys, s["keys"]),
                "values": view(self._new_values, s["values"]),
            }
        if graph == "sampler":
            offset = self.batch * self._spans[si][0] * s["uniforms"][2]
            return {
                "logits": view(self._logits, s["logits"]),
                "guidance": self._guidance[si],
                "top_k": self._top_k,
                "top_p": self._top_p,
                "uniforms": view(self._uniforms, s["uniforms"], offset),
                "reference_tokens": view(self._reference, s["reference_tokens"], offset),
                "force_mask": view(self._force, s["force_mask"], offset),
            }, {"tokens": view(self._tokens, s["tokens"])}
        if graph == "fold":
            return {
                "tokens": view(self._tokens, s["tokens"]),
                "f_hat": self._f_hat[si % 2],
                "scale_index": self._scale_index[si],
                "next_positions": self._positions[si + 1],
            }, {"f_hat_out": self._f_hat[(si + 1) % 2], "x_next": view(self._folded, s["x_next"])}
        if graph == "decoder":
            return {"indices": self._indices}, {"image": self._image}
        raise KeyError(f"the session does not run graph {graph!r}")

    def _run(self, graph: str, si: int) -> None:
        key = (graph, si)
        if key not in self._bindings:
            binding = self.backend.graph(graph).io_binding()
            inputs, outputs = self._buffers(graph, si)
            for name, array in inputs.items():
                binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            for name, array in outputs.items():
                binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            self._bindings[key] = binding
        self.backend.graph(graph).run_with_iobinding(self._bindings[key])

    # -- the Session protocol ----------------------------------------------------------------------

    def generate(self, request: BatchRequest, stage: Stage = no_stage) -> tuple[np.ndarray, np.ndarray]:
        """Load the request into the session's buffers, run the stages, return copies of images and indices."""
        if request.labels.shape != (self.batch,):
            raise OrtBackendError(f"a request of {request.labels.shape[0]} images for a session of {self.batch}")
        self._labels[:] = cfg_rows(request.labels, self.backend.bundle.num_classes)
        offset = 0
        for start, q in self._spans:  # scale-major: each scale's (B, q, branches) block contiguous
            block = request.uniforms[:, start : start + q]
            reference, force = request.scale_block(start, q)
            self._uniforms[offset : offset + block.size] = block.reshape(-1)
            self._reference[offset : offset + block.size] = reference.reshape(-1)
            self._force[offset : offset + block.size] = force.reshape(-1)
            offset += block.size
        self._guidance[:], self._top_k[:], self._top_p[:] = request.guidance, request.top_k, request.top_p
        self._sent += request.nbytes
        run_stages(self, len(self._spans), stage)
        self._received += self._image.nbytes + self._indices.nbytes
        return self._image.copy(), self._indices.copy()

    # -- the stages ----------------------------------------------------------------------------------

    def prefill(self) -> None:
        """Compute the conditioning of the loaded labels."""
        self._f_hat[0].fill(0)  # fold(0) reads buffer 0; a reused session starts from an empty f̂
        self._run("ar_prefill", 0)

    def step(self, scale_index: int) -> None:
        """Run the generator on the input of ``scale_index`` and write its keys/values into the cache."""
        self._run("ar_step", scale_index)
        start, q = self._spans[scale_index]
        shape = self._shapes("ar_step", scale_index)["keys"]  # (L, N, H, q, D)
        self._cache_keys[:, :, :, start : start + q] = self._view(self._new_keys, shape)
        self._cache_values[:, :, :, start : start + q] = self._view(self._new_values, shape)

    def sample(self, scale_index: int) -> None:
        """Sample this scale's tokens (B, q, 2) from the current logits."""
        self._run("sampler", scale_index)
        start, q = self._spans[scale_index]
        tokens = self._view(self._tokens, self._shapes("sampler", scale_index)["tokens"])  # (B, q, 2)
        self._indices[:, :, start : start + q] = tokens.transpose(0, 2, 1)

    def fold(self, scale_index: int) -> None:
        """Add this scale's tokens to f̂ and compute the next scale's folded input."""
        self._run("fold", scale_index)

    def decode(self) -> None:
        """Decode the sampled indices to images (B, 3, H, W) float32 in [-1, 1]."""
        self._run("decoder", 0)

    def close(self) -> None:
        self._bindings.clear()

    def __enter__(self) -> OrtSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
