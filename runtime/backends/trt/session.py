"""One batch size's generation on TensorRT, state on the device, optionally one CUDA graph per generation.

A ``TrtSession`` owns every per-generation tensor in device memory: the KV cache, the conditioning, logits,
f̂ (two buffers, read one / write the other), the folded input, tokens and indices. Only the request
(labels, sampling parameters, uniforms, reference tokens and force mask; one copy from pinned memory, laid
out by ``RequestLayout``) goes up;
only indices and images come down (into pinned memory). Each (graph, batch, scale) has its own optimization
profile with fixed shapes and its own execution context; with ``use_cuda_graphs`` the session runs its first
generation eagerly and captures its second whole as one CUDA graph, which every later generation replays.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import numpy as np

from imagefolder.core import cuda
from imagefolder.core.schedule import cfg_rows, positions
from imagefolder.core.specs import cache_input_names
from imagefolder.errors import InputError
from imagefolder.runtime.backends.base import BatchRequest, Stage, no_stage, run_stages
from imagefolder.runtime.backends.trt.engine import ExecutionContext

if TYPE_CHECKING:
    from imagefolder.runtime.backends.trt.backend import TrtBackend

log = logging.getLogger(__name__)

ALIGNMENT = 256  # TensorRT wants every tensor address 256-byte aligned


class RequestLayout:
    """Where every per-image input of one generation lies in one buffer, each segment 256-byte aligned.

    Segments: ``labels`` (the N CFG rows); per scale ``uniforms[si]``, ``reference[si]`` (int32) and
    ``force[si]`` (bool), each (B, q, branches), and ``guidance[si]`` (B,); ``top_k`` and ``top_p`` (B,).
    The host packs a request into pinned memory with this layout and one copy moves it to the device,
    where each engine reads its segment in place: the CUDA graph captures that one copy, so a replay
    takes the next request's reference tokens and mask like its uniforms.
    """

    def __init__(self, batch: int, spans: list[tuple[int, int]], branches: int):
        self.batch, self.spans, self.branches = batch, spans, branches
        self.segments: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self.nbytes = 0
        self._add("labels", np.int64, (2 * batch,))
        for si, (_, q) in enumerate(spans):
            self._add(f"uniforms[{si}]", np.float32, (batch, q, branches))
            self._add(f"reference[{si}]", np.int32, (batch, q, branches))
            self._add(f"force[{si}]", np.bool_, (batch, q, branches))
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
            values[f"reference[{si}]"], values[f"force[{si}]"] = request.scale_block(start, q)
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
                "reference_tokens": self._segment(f"reference[{si}]"),
                "force_mask": self._segment(f"force[{si}]"),
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
