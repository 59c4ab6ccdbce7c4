"""A small layer over cuda-python's runtime API: device buffers, streams, events, copies, CUDA graphs.

Every cuda-python call returns ``(error, *values)``; each one passes through ``check``, which raises
``CudaError`` on any error and unwraps the values; the errors a user meets before any work (a driver
older than cuda-python's CUDA, no GPU) say what to do. cuda-python is imported lazily, so this module
imports on machines without CUDA; ``CudaUnavailable`` says how to install it. No torch.

Every helper that enqueues work on a ``Stream`` (a copy, a memset, a graph launch; TensorRT's
enqueue counts itself) adds one to ``Stream.launches`` unless the stream is capturing: the host's
launch count, which the profiler reports and which a whole-generation CUDA graph brings down to one.
"""

from __future__ import annotations

import ctypes

import numpy as np

from imagefolder.core import gpu_stack
from imagefolder.errors import DeviceError, MissingDependency

NO_DEVICE = "cudaErrorNoDevice"  # 100
# What to do about the errors met before any work starts, by cuda-python's name of the error.
ERROR_HINTS = {
    "cudaErrorInsufficientDriver": gpu_stack.insufficient_driver_hint,  # 35: the driver is older than the runtime
    NO_DEVICE: lambda: "no CUDA GPU is visible (check nvidia-smi, CUDA_VISIBLE_DEVICES, a container's --gpus)",
}


class CudaUnavailable(MissingDependency):
    """cuda-python is not installed."""


class CudaError(DeviceError):
    """A CUDA call returned an error."""


_cudart = None


def cudart():
    """The cuda-python runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime as module
        except ImportError:
            try:
                from cuda import cudart as module
            except ImportError as err:
                raise gpu_stack.missing("cuda-python", err, cls=CudaUnavailable) from err
        _cudart = module
    return _cudart


def check(result):
    """Raise ``CudaError`` if a cuda-python result carries an error; return its value(s) otherwise.

    Accepts both the runtime (``cudaError_t``) and the driver (``CUresult``) enums: success is 0 in both.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        hint = f": {ERROR_HINTS[name]()}" if name in ERROR_HINTS else ""
        raise CudaError(f"CUDA error {int(err)} ({name}){hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------------------------------------------------
# Device


def device_count() -> int:
    """How many CUDA GPUs are visible: 0 when the runtime reports none; ``CudaError`` for any other failure.

    The one question whose "no" is an answer rather than a fault, e.g. for deciding to skip GPU tests:
    a driver too old for cuda-python (error 35) is a broken installation and raises.
    """
    result = cudart().cudaGetDeviceCount()
    if getattr(result[0], "name", None) == NO_DEVICE:
        return 0
    return int(check(result))


def set_device(device: int) -> None:
    """Make ``device`` this host thread's current CUDA device (a Triton instance on its own GPU)."""
    check(cudart().cudaSetDevice(int(device)))


def device_properties(device: int = 0) -> dict:
    """Name, compute capability and memory of a CUDA device."""
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(device))
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode()
    return {
        "name": str(name).strip(),
        "compute_capability": f"{props.major}.{props.minor}",
        "total_memory": int(props.totalGlobalMem),
        "integrated": bool(props.integrated),  # Jetson: CPU and GPU share one memory
    }


# ---------------------------------------------------------------------------------------------------------------------
# Memory


class PinnedHostBuffer:
    """Page-locked host memory (``cudaMallocHost``) with a numpy view.

    Copies between it and the device are truly asynchronous and may be captured in a CUDA graph
    (copies from pageable memory stall the host and cannot be captured). The host must not write
    it while a copy from it may still be in flight: synchronise the stream first.
    """

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes)))
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0, np.uint8)  # no view may outlive the memory
            check(cudart().cudaFreeHost(self.ptr))
            self.ptr = 0


def memcpy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream) -> None:
    """Queue a copy of ``nbytes`` between raw addresses; ``kind`` is "htod", "dtoh" or "dtod"."""
    rt = cudart()
    kinds = {
        "htod": rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
        "dtoh": rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        "dtod": rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
    }
    check(rt.cudaMemcpyAsync(dst, src, nbytes, kinds[kind], stream.handle))
    stream.count()


class DeviceBuffer:
    """A device allocation of ``nbytes`` (cudaMalloc aligns to at least 256 bytes, as TensorRT needs)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0

    def __repr__(self) -> str:
        return f"DeviceBuffer(0x{self.ptr:x}, {self.nbytes} bytes)"


class DeviceArray:
    """A typed, shaped view of a device buffer (the whole buffer or its first bytes)."""

    def __init__(self, shape: tuple[int, ...], dtype, buffer: DeviceBuffer | None = None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.owns = buffer is None
        self.buffer = DeviceBuffer(self.nbytes) if buffer is None else buffer
        if self.nbytes > self.buffer.nbytes:
            raise ValueError(f"{self.shape} {self.dtype} needs {self.nbytes} bytes, the buffer {self.buffer.nbytes}")

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """Queue a host → device copy of ``array`` (must match shape and dtype)."""
        array = np.ascontiguousarray(array)
        if array.shape != self.shape or array.dtype != self.dtype:
            raise ValueError(f"upload of {array.shape} {array.dtype} into {self.shape} {self.dtype}")
        memcpy_htod_async(self.ptr, array, stream)

    def download(self, stream: Stream) -> np.ndarray:
        """Copy to a new host array and wait for it."""
        out = np.empty(self.shape, self.dtype)
        memcpy_dtoh_async(out, self.ptr, stream)
        stream.synchronize()
        return out

    def zero(self, stream: Stream) -> None:
        check(cudart().cudaMemsetAsync(self.ptr, 0, self.nbytes, stream.handle))
        stream.count()

    def free(self) -> None:
        if self.owns:
            self.buffer.free()


def memcpy_htod_async(dst: int, array: np.ndarray, stream: Stream) -> None:
    # Pageable host memory: the runtime stages the data before returning, so the array may go away.
    # It stalls the host and cannot be captured: the generation loop uploads from pinned memory instead.
    memcpy_async(dst, array.ctypes.data, array.nbytes, "htod", stream)


def memcpy_dtoh_async(array: np.ndarray, src: int, stream: Stream) -> None:
    memcpy_async(array.ctypes.data, src, array.nbytes, "dtoh", stream)


def memcpy2d_dtod_async(
    dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: Stream
) -> None:
    """Copy ``height`` rows of ``width`` bytes between pitched device regions (capturable in a CUDA graph)."""
    rt = cudart()
    check(
        rt.cudaMemcpy2DAsync(
            dst, dst_pitch, src, src_pitch, width, height, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle
        )
    )
    stream.count()


# ---------------------------------------------------------------------------------------------------------------------
# Streams, events, graphs


class Stream:
    """A non-blocking stream (TensorRT's enqueue on the legacy default stream adds device syncs).

    ``launches`` counts the operations the host enqueued on it outside captures (``count``);
    ``capturing`` is set by ``CudaGraph.begin`` and cleared when the capture ends.
    """

    def __init__(self):
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.launches = 0
        self.capturing = False

    def count(self) -> None:
        """One operation was enqueued: a launch, unless it was recorded into a capture."""
        if not self.capturing:
            self.launches += 1

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle))
            self.handle = None


class Event:
    def __init__(self):
        self.handle = check(cudart().cudaEventCreate())

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle))

    def synchronize(self) -> None:
        check(cudart().cudaEventSynchronize(self.handle))

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to ``end`` (both recorded and complete)."""
        return float(check(cudart().cudaEventElapsedTime(self.handle, end.handle)))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaEventDestroy(self.handle))
            self.handle = None


class CudaGraph:
    """Work captured from a stream once, then replayed with one launch.

    A graph freezes every kernel argument (tensor addresses, shapes) of the captured work: the
    caller keys graphs by whatever those depend on and captures a new one when any of it changes.
    """

    def __init__(self):
        self.graph = None
        self.exec = None

    def begin(self, stream: Stream) -> None:
        rt = cudart()
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        stream.capturing = True

    def end(self, stream: Stream) -> None:
        rt = cudart()
        stream.capturing = False
        try:
            self.graph = check(rt.cudaStreamEndCapture(stream.handle))
        except CudaError:
            self.graph = None
            raise
        self.exec = check(rt.cudaGraphInstantiate(self.graph, 0))

    def abort(self, stream: Stream) -> None:
        """End a capture that failed midway (if it is still open), discarding what was captured."""
        rt = cudart()
        stream.capturing = False
        result = rt.cudaStreamEndCapture(stream.handle)
        graph = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if graph is not None and int(result[0]) == 0:
            check(rt.cudaGraphDestroy(graph))

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream.handle))
        stream.count()

    def destroy(self) -> None:
        rt = cudart()
        if self.exec is not None:
            check(rt.cudaGraphExecDestroy(self.exec))
            self.exec = None
        if self.graph is not None:
            check(rt.cudaGraphDestroy(self.graph))
            self.graph = None


class EventTimer:
    """``DeviceTimer`` with CUDA events on one stream: start/stop record events, collect reads them.

    Events are pooled and reused; nothing synchronises until ``collect``.
    """

    def __init__(self, stream: Stream):
        self.stream = stream
        self._free: list[Event] = []
        self._open: dict[str, Event] = {}
        self._done: list[tuple[str, Event, Event]] = []

    def _event(self) -> Event:
        return self._free.pop() if self._free else Event()

    def start(self, label: str) -> None:
        if label in self._open:
            raise RuntimeError(f"timer {label!r} started twice")
        event = self._event()
        event.record(self.stream)
        self._open[label] = event

    def stop(self, label: str) -> None:
        start = self._open.pop(label, None)
        if start is None:
            raise RuntimeError(f"timer {label!r} stopped without a start")
        end = self._event()
        end.record(self.stream)
        self._done.append((label, start, end))

    def collect(self) -> list[tuple[str, float]]:
        out = []
        for label, start, end in self._done:
            end.synchronize()
            out.append((label, start.elapsed_ms(end)))
            self._free += [start, end]
        self._done = []
        return out

    def destroy(self) -> None:
        for event in self._free + list(self._open.values()) + [e for _, s, f in self._done for e in (s, f)]:
            event.destroy()
        self._free, self._open, self._done = [], {}, []
