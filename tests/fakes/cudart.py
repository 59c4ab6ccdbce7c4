"""A strict fake of the cuda-python runtime API subset imagefolder uses, backed by numpy.

Installed as both ``cuda.bindings.runtime`` (cuda-python >= 12.6) and ``cuda.cudart`` (older): see
``tests/fakes/__init__.py``. It keeps cuda-python's calling convention, read from
NVIDIA/cuda-python ``cuda_bindings/cuda/bindings/runtime.pyx.in``: every call returns a tuple, the
``cudaError_t`` first, then the values (``(err,)`` for calls without values, ``(err, None)`` on
failure); streams, events and graphs are handle objects that ``int()`` accepts, and every stream
argument may also be an int (``None`` and 0 are the legacy default stream); enum arguments must be
the enum (the bindings read ``mode.value`` / ``kind.value``).

Simulated device: allocations get 256-byte aligned addresses in a range no host pointer uses, each
backed by a numpy byte array, and addresses are never reused, so a freed buffer stays detectably
freed. Every copy, memset and kernel access is bounds-checked against a live allocation (or a live
pinned host allocation). Host pointers outside the pinned table are treated as pageable process
memory and accessed with ctypes, as the real runtime would.

Simplification (documented, deliberate): work runs eagerly, in order, when it is enqueued; a
stream's work counts as *complete* only after the host synchronised it (stream, event or device
synchronisation), so event timings and "is the previous work finished" questions behave as on a GPU
that has not caught up yet. Timings come from a simulated device clock: monotonic, strictly positive
between two records.

Rules enforced, each with the error the real runtime returns (the CUDA Programming Guide, section
"Prohibited and Unhandled Operations" of CUDA Graphs / stream capture, and the error table quoted in
NVIDIA/cuda-python PR #458):

- capture cannot begin on the legacy default stream (``cudaErrorStreamCaptureUnsupported``), nor on a
  stream already capturing (``cudaErrorIllegalState``); ending a capture on a stream that is not
  capturing is ``cudaErrorIllegalState``. The rules are in cuda-python's docstring of
  ``cudaStreamBeginCapture``; these three codes are not named there and follow HIP, which mirrors CUDA
  (ROCm clr ``hip_graph.cpp``): the one assumption here not read from an NVIDIA source;
- while a capture in global or thread-local mode is active (this fake is single-threaded, so the two
  coincide), "potentially unsafe" calls (``cudaMalloc``, ``cudaFree``, ``cudaMallocHost``,
  ``cudaFreeHost``, synchronous ``cudaMemcpy``, ``cudaDeviceSynchronize``, ``cudaStreamSynchronize``,
  ``cudaEventSynchronize``) return ``cudaErrorStreamCaptureUnsupported`` and invalidate the capture;
  synchronising the capturing stream itself is refused in every mode. Work enqueued on an invalidated
  capture returns ``cudaErrorStreamCaptureInvalidated``, and so does ``cudaStreamEndCapture``, with no
  graph. Legacy-stream work while a *blocking* stream captures is ``cudaErrorStreamCaptureImplicit``;
- work enqueued during capture is recorded, not executed; ``cudaGraphLaunch`` replays the recorded
  operations against the captured *addresses*, reading the memory as it is at replay time, so a graph
  whose buffers were freed faults and a graph sees inputs the host changed since the capture;
- an event last recorded during a capture cannot be synchronised or timed (``cudaErrorCapturedEvent``);
  an event never recorded cannot be timed (``cudaErrorInvalidResourceHandle``); an event whose work
  the host has not synchronised is ``cudaErrorNotReady`` for ``cudaEventElapsedTime``;
- bad pointers for a copy or memset (unallocated, freed, overrun, device pointer where a host one is
  due or the reverse) are ``cudaErrorInvalidValue``; ``width`` over a pitch is
  ``cudaErrorInvalidPitchValue``; freeing anything but a live allocation's base is
  ``cudaErrorInvalidValue``; unknown or destroyed handles are ``cudaErrorInvalidResourceHandle``
  (streams, events) or ``cudaErrorInvalidValue`` (graphs);
- the host must not modify pinned memory that an asynchronous copy reads before it synchronised that
  copy (CUDA Programming Guide, "Asynchronous Concurrent Execution": the copy may read it any time until
  it completes); checked at every call, recorded in ``faults``. Pageable memory is staged by
  ``cudaMemcpyAsync`` before it returns, so it may change at once;
- a fault while work *executes* (a kernel touching freed or too little memory, a replayed copy whose
  buffer is gone) is the sticky ``cudaErrorIllegalAddress``: every later call returns it, as a CUDA
  context is unusable after one.

Counters: ``FakeCuda.counters[stream]`` counts what the host enqueued outside captures on each
stream (``kernels``, ``memcpy``, ``memset``, ``graph_launches``); ``FakeCuda.launches(stream)`` sums
them. Captured work is counted under ``captured`` and replayed work is not counted again.
"""

from __future__ import annotations

import bisect
import ctypes
import types
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

ALIGNMENT = 256  # cudaMalloc returns addresses aligned to at least 256 bytes
DEVICE_BASE = 0x2000_0000_0000  # far below the mmap area and above the heap: no host pointer lands here
DEVICE_SPAN = 1 << 40
DEFAULT_STREAMS = (0, 1, 2)  # NULL, cudaStreamLegacy, cudaStreamPerThread
COUNTER = {"memcpy": "memcpy", "memset": "memset", "kernel": "kernels", "graph": "graph_launches"}


class cudaError_t(IntEnum):  # noqa: N801 - cuda-python's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidPitchValue = 12
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureUnmatched = 903
    cudaErrorStreamCaptureImplicit = 906
    cudaErrorCapturedEvent = 907


class cudaMemcpyKind(IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaStreamCaptureStatus(IntEnum):  # noqa: N801
    cudaStreamCaptureStatusNone = 0
    cudaStreamCaptureStatusActive = 1
    cudaStreamCaptureStatusInvalidated = 2


E = cudaError_t
OK = E.cudaSuccess


class _Handle:
    """cuda-python's opaque handle types: ``int(handle)`` is the address, ``getPtr()`` too."""

    def __init__(self, init_value: int = 0):
        self._value = int(init_value)

    def __int__(self) -> int:
        return self._value

    def getPtr(self) -> int:  # noqa: N802
        return self._value

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and int(other) == self._value

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 0x{self._value:x}>"


class cudaStream_t(_Handle):  # noqa: N801
    pass


class cudaEvent_t(_Handle):  # noqa: N801
    pass


class cudaGraph_t(_Handle):  # noqa: N801
    pass


class cudaGraphExec_t(_Handle):  # noqa: N801
    pass


@dataclass
class cudaDeviceProp:  # noqa: N801
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int  # noqa: N815
    integrated: int
    multiProcessorCount: int = 8  # noqa: N815


class Fault(Exception):
    """An access the hardware would refuse; carries the error code and a message for the test."""

    def __init__(self, code: cudaError_t, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------------------------------
# State


@dataclass
class Allocation:
    base: int  # the address handed out (device: fake range; pinned host: the real address of `data`)
    size: int
    data: np.ndarray  # backing bytes, kept alive after free so the address is never reused
    live: bool = True


@dataclass
class Capture:
    mode: cudaStreamCaptureMode
    ops: list = field(default_factory=list)
    invalidated: bool = False


@dataclass
class Stream:
    handle: int
    flags: int
    live: bool = True
    capture: Capture | None = None
    seq: int = 0  # operations enqueued so far
    done: int = 0  # operations the host has synchronised


@dataclass
class Event:
    handle: int
    live: bool = True
    stream: int | None = None  # stream of the last record
    seq: int = 0  # that stream's sequence number at the record
    time_ms: float | None = None
    captured: bool = False  # last recorded inside a capture


@dataclass
class Op:
    """One unit of stream work: a copy, a memset or a kernel (a TensorRT enqueue)."""

    kind: str  # "memcpy", "memset", "kernel", "graph"
    label: str
    run: object  # callable(FakeCuda) -> None; raises Fault
    cost_ms: float = 0.001
    pinned: tuple = ()  # (address, bytes) of pinned host memory the op reads


class FakeCuda:
    """One simulated GPU. ``module()`` gives the cuda-python-shaped module bound to it."""

    def __init__(self, name: str = "Fake Orin", compute_capability: tuple[int, int] = (8, 7),
                 total_memory: int = 8 << 30, integrated: bool = True):
        self.name, self.compute_capability = name, tuple(compute_capability)
        self.total_memory, self.integrated = int(total_memory), integrated
        self.device: list[Allocation] = []  # sorted by base
        self.pinned: list[Allocation] = []  # sorted by base
        self.used = 0
        self._next = DEVICE_BASE
        self.streams: dict[int, Stream] = {h: Stream(h, 0) for h in DEFAULT_STREAMS}
        self.events: dict[int, Event] = {}
        self.graphs: dict[int, list[Op]] = {}
        self.execs: dict[int, list[Op]] = {}
        self._handles = 0x5000
        self.sticky: cudaError_t | None = None
        self.faults: list[str] = []
        self.clock_ms = 0.0
        self.counters: dict[int, Counter] = defaultdict(Counter)
        self.pending_reads: list[tuple] = []  # pinned host memory read by copies the host has not synchronised

    # -- public helpers for tests and the fake TensorRT ----------------------------------------------------------------

    def launches(self, stream) -> int:
        """Work the host enqueued on ``stream`` outside captures: kernels, copies, memsets, graph launches."""
        c = self.counters[int(stream or 0)]
        return c["kernels"] + c["memcpy"] + c["memset"] + c["graph_launches"]

    def live_allocations(self) -> list[Allocation]:
        return [a for a in self.device if a.live]

    def fault(self, code: cudaError_t, message: str) -> None:
        """Record an execution fault; the illegal-address error becomes sticky, as on a real context."""
        self.faults.append(message)
        if code == E.cudaErrorIllegalAddress:
            self.sticky = code

    def find(self, table: list[Allocation], ptr: int) -> Allocation | None:
        i = bisect.bisect_right([a.base for a in table], ptr) - 1
        if i >= 0 and table[i].base <= ptr < table[i].base + max(table[i].size, 1):
            return table[i]
        return None

    def is_device_pointer(self, ptr: int) -> bool:
        return DEVICE_BASE <= ptr < DEVICE_BASE + DEVICE_SPAN

    def device_view(self, ptr: int, nbytes: int, what: str = "device memory") -> np.ndarray:
        """The bytes [ptr, ptr + nbytes) of one live device allocation, or ``Fault``."""
        alloc = self.find(self.device, ptr) if self.is_device_pointer(ptr) else None
        if alloc is None:
            raise Fault(E.cudaErrorInvalidValue, f"{what} 0x{ptr:x} is not device memory cudaMalloc returned")
        if not alloc.live:
            raise Fault(E.cudaErrorInvalidValue, f"{what} 0x{ptr:x} lies in an allocation that was freed")
        offset = ptr - alloc.base
        if offset + nbytes > alloc.size:
            over = offset + nbytes - alloc.size
            raise Fault(E.cudaErrorInvalidValue, f"{what} 0x{ptr:x}+{nbytes} overruns its allocation of "
                                                 f"{alloc.size} bytes at 0x{alloc.base:x} by {over}")
        return alloc.data[offset:offset + nbytes]

    def host_address(self, ptr: int, nbytes: int, what: str = "host memory") -> int:
        """A host pointer's real address: pinned allocations are bounds-checked, pageable memory is trusted."""
        if self.is_device_pointer(ptr):
            raise Fault(E.cudaErrorInvalidValue, f"{what} 0x{ptr:x} is a device pointer")
        if ptr == 0:
            raise Fault(E.cudaErrorInvalidValue, f"{what} is NULL")
        alloc = self.find(self.pinned, ptr)
        if alloc is not None:
            if not alloc.live:
                raise Fault(E.cudaErrorInvalidValue, f"{what} 0x{ptr:x} is pinned memory that was freed")
            if ptr - alloc.base + nbytes > alloc.size:
                raise Fault(E.cudaErrorInvalidValue, f"{what} 0x{ptr:x}+{nbytes} overruns its pinned allocation")
        return ptr

    def stream(self, stream) -> Stream:
        handle = int(stream or 0)
        s = self.streams.get(handle)
        if s is None or not s.live:
            raise Fault(E.cudaErrorInvalidResourceHandle, f"stream 0x{handle:x} does not exist")
        return s

    def enqueue(self, stream, op: Op) -> cudaError_t:
        """Record ``op`` if ``stream`` is capturing, else run it now (eager stand-in for asynchronous work)."""
        s = self.stream(stream)
        if s.handle in DEFAULT_STREAMS:
            blocking = [c for c in self.streams.values() if c.capture and not c.flags & 1]
            if blocking:  # the legacy stream would depend on the capturing blocking stream
                for c in blocking:
                    c.capture.invalidated = True
                return E.cudaErrorStreamCaptureImplicit
        if s.capture is not None:
            if s.capture.invalidated:
                return E.cudaErrorStreamCaptureInvalidated
            s.capture.ops.append(op)
            self.counters[s.handle]["captured"] += 1
            return OK
        self.counters[s.handle][COUNTER[op.kind]] += 1
        s.seq += 1
        self._execute(op, s)
        return OK

    def _execute(self, op: Op, stream: Stream) -> None:
        try:
            op.run(self)
        except Fault as fault:
            self.fault(E.cudaErrorIllegalAddress, f"{op.label}: {fault}")
        self.clock_ms += op.cost_ms
        for address, nbytes in op.pinned:  # on a GPU the DMA may read it any time until the stream is synchronised
            self.pending_reads.append((stream.handle, stream.seq, address, nbytes, ctypes.string_at(address, nbytes)))

    def check_pinned_races(self) -> None:
        """Pinned memory an asynchronous copy reads must keep its contents until the host synchronised the copy."""
        pending = []
        for handle, seq, address, nbytes, snapshot in self.pending_reads:
            if self.streams[handle].done >= seq:
                continue
            if ctypes.string_at(address, nbytes) != snapshot:
                self.faults.append(f"the host modified pinned memory 0x{address:x} ({nbytes} bytes) while an "
                                   f"asynchronous copy from it on stream 0x{handle:x} was not yet synchronised")
                continue
            pending.append((handle, seq, address, nbytes, snapshot))
        self.pending_reads = pending

    def active_captures(self) -> list[Stream]:
        return [s for s in self.streams.values() if s.capture is not None]

    def unsafe(self, call: str) -> cudaError_t | None:
        """A potentially unsafe call: refused (and the capture invalidated) during a non-relaxed capture."""
        strict = [s for s in self.active_captures()
                  if s.capture.mode != cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed]
        for s in strict:
            s.capture.invalidated = True
        if strict:
            self.faults.append(f"{call} during stream capture: the capture is invalidated")
            return E.cudaErrorStreamCaptureUnsupported
        return None

    def _handle(self) -> int:
        self._handles += 0x10
        return self._handles

    def _allocate(self, size: int, table: list[Allocation], device: bool) -> Allocation:
        size = int(size)
        padded = -(-max(size, 1) // ALIGNMENT) * ALIGNMENT
        if device:
            data = np.zeros(padded, np.uint8)
            base = self._next
            self._next += padded + ALIGNMENT  # a gap: an overrun never lands in the next allocation
        else:
            raw = np.zeros(padded + ALIGNMENT, np.uint8)
            shift = -raw.ctypes.data % ALIGNMENT
            data = raw[shift:shift + padded]
            base = data.ctypes.data
        alloc = Allocation(base, size, data)
        bisect.insort(table, alloc, key=lambda a: a.base)
        return alloc

    def _free(self, table: list[Allocation], ptr: int) -> cudaError_t:
        alloc = self.find(table, ptr)
        if alloc is None or not alloc.live or alloc.base != ptr:
            return E.cudaErrorInvalidValue
        alloc.live = False
        if table is self.device:
            self.used -= alloc.size
        return OK

    def _synchronised(self, s: Stream, upto: int | None = None) -> None:
        s.done = max(s.done, s.seq if upto is None else upto)

    # -- copies --------------------------------------------------------------------------------------------------------

    def _copy_op(self, dst: int, src: int, width: int, height: int, dpitch: int, spitch: int,
                 kind: cudaMemcpyKind, label: str) -> Op:
        """Validate a (2D) copy now and return the op that performs it (re-validated when it runs)."""
        if kind == cudaMemcpyKind.cudaMemcpyDefault:
            src_dev, dst_dev = self.is_device_pointer(src), self.is_device_pointer(dst)
        else:
            src_dev = kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
            dst_dev = kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        extent_src = (height - 1) * spitch + width if height else 0
        extent_dst = (height - 1) * dpitch + width if height else 0

        def address(ptr: int, extent: int, device: bool, what: str) -> int:
            if device:
                return self.device_view(ptr, extent, what).ctypes.data if extent else 0
            return self.host_address(ptr, extent, what)

        def run(cuda: FakeCuda) -> None:
            if not width or not height:
                return
            s_addr = address(src, extent_src, src_dev, "source")
            d_addr = address(dst, extent_dst, dst_dev, "destination")
            for row in range(height):
                ctypes.memmove(d_addr + row * dpitch, s_addr + row * spitch, width)

        pinned = ()
        if width and height:
            address(src, extent_src, src_dev, "source")
            address(dst, extent_dst, dst_dev, "destination")
            if not src_dev and self.find(self.pinned, src) is not None:
                pinned = ((src, extent_src),)
        return Op("memcpy", label, run, cost_ms=0.002 + width * height / 2e7, pinned=pinned)

    # -- the cuda-python API -------------------------------------------------------------------------------------------

    def module(self, name: str = "cuda.bindings.runtime") -> types.ModuleType:
        """A module with cuda-python's names, bound to this device."""
        module = types.ModuleType(name, "fake cuda-python runtime (tests/fakes/cudart.py)")
        for attr in dir(self):
            if attr.startswith("cuda"):
                setattr(module, attr, getattr(self, attr))
        for obj in (cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode, cudaStreamCaptureStatus, cudaStream_t,
                    cudaEvent_t, cudaGraph_t, cudaGraphExec_t, cudaDeviceProp):
            setattr(module, obj.__name__, obj)
        module.cudaStreamDefault, module.cudaStreamNonBlocking = 0, 1
        module.cudaStreamLegacy, module.cudaStreamPerThread = 1, 2
        module._fake = self
        return module

    def _gate(self, nvalues: int):
        """The sticky error, shaped like the call's result, if the context is broken (every call starts here)."""
        self.check_pinned_races()
        if self.sticky is None:
            return None
        return (self.sticky,) + (None,) * nvalues

    def cudaGetErrorName(self, error):  # noqa: N802
        return OK, E(int(error)).name.encode()

    def cudaGetErrorString(self, error):  # noqa: N802
        return OK, E(int(error)).name.encode()

    def cudaGetDeviceCount(self):  # noqa: N802
        return self._gate(1) or (OK, 1)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        if gate := self._gate(1):
            return gate
        if int(device) != 0:
            return E.cudaErrorInvalidDevice, None
        major, minor = self.compute_capability
        return OK, cudaDeviceProp(self.name.encode(), major, minor, self.total_memory, int(self.integrated))

    def cudaDeviceSynchronize(self):  # noqa: N802
        if gate := self._gate(0):
            return gate
        if err := self.unsafe("cudaDeviceSynchronize"):
            return (err,)
        for s in self.streams.values():
            self._synchronised(s)
        return (OK,)

    def cudaMalloc(self, size):  # noqa: N802
        if gate := self._gate(1):
            return gate
        if err := self.unsafe("cudaMalloc"):
            return err, None
        if int(size) == 0:
            return OK, 0
        if self.used + int(size) > self.total_memory:
            return E.cudaErrorMemoryAllocation, None
        alloc = self._allocate(size, self.device, device=True)
        self.used += alloc.size
        return OK, alloc.base

    def cudaFree(self, devPtr):  # noqa: N802, N803
        if gate := self._gate(0):
            return gate
        if err := self.unsafe("cudaFree"):
            return (err,)
        if int(devPtr) == 0:
            return (OK,)
        return (self._free(self.device, int(devPtr)),)

    def cudaMallocHost(self, size):  # noqa: N802
        if gate := self._gate(1):
            return gate
        if err := self.unsafe("cudaMallocHost"):
            return err, None
        return OK, self._allocate(size, self.pinned, device=False).base

    def cudaFreeHost(self, ptr):  # noqa: N802
        if gate := self._gate(0):
            return gate
        if err := self.unsafe("cudaFreeHost"):
            return (err,)
        return (self._free(self.pinned, int(ptr)),)

    def cudaMemcpy(self, dst, src, count, kind):  # noqa: N802
        if gate := self._gate(0):
            return gate
        kind = _enum(kind, cudaMemcpyKind)
        if err := self.unsafe("cudaMemcpy"):
            return (err,)
        try:
            op = self._copy_op(int(dst), int(src), int(count), 1, int(count), int(count), kind, "cudaMemcpy")
        except Fault:
            return (E.cudaErrorInvalidValue,)
        err = self.enqueue(0, op)
        if err == OK:
            for s in self.streams.values():  # synchronous: returns once the copy (and the legacy stream) is done
                self._synchronised(s)
        return (err,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        return self.cudaMemcpy2DAsync(dst, count, src, count, count, 1, kind, stream)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        if gate := self._gate(0):
            return gate
        kind = _enum(kind, cudaMemcpyKind)
        if int(width) > int(dpitch) or int(width) > int(spitch):
            return (E.cudaErrorInvalidPitchValue,)
        try:
            self.stream(stream)
            op = self._copy_op(int(dst), int(src), int(width), int(height), int(dpitch), int(spitch), kind,
                               f"cudaMemcpy2DAsync({kind.name})")
        except Fault as fault:
            self.faults.append(str(fault))
            return (fault.code,)
        return (self.enqueue(stream, op),)

    def cudaMemsetAsync(self, devPtr, value, count, stream):  # noqa: N802, N803
        if gate := self._gate(0):
            return gate
        ptr, count, value = int(devPtr), int(count), int(value) & 0xFF

        def run(cuda: FakeCuda) -> None:
            cuda.device_view(ptr, count, "memset destination")[:] = value

        try:
            self.stream(stream)
            self.device_view(ptr, count, "memset destination")
        except Fault as fault:
            self.faults.append(str(fault))
            return (fault.code,)
        return (self.enqueue(stream, Op("memset", "cudaMemsetAsync", run)),)

    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        if gate := self._gate(1):
            return gate
        if int(flags) not in (0, 1):
            return E.cudaErrorInvalidValue, None
        handle = self._handle()
        self.streams[handle] = Stream(handle, int(flags))
        return OK, cudaStream_t(handle)

    def cudaStreamCreate(self):  # noqa: N802
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        if gate := self._gate(0):
            return gate
        try:
            s = self.stream(stream)
        except Fault as fault:
            return (fault.code,)
        if s.capture is not None:  # synchronising a capturing stream is illegal in every mode
            s.capture.invalidated = True
            self.faults.append("cudaStreamSynchronize on a capturing stream: the capture is invalidated")
            return (E.cudaErrorStreamCaptureUnsupported,)
        if err := self.unsafe("cudaStreamSynchronize"):
            return (err,)
        self._synchronised(s)
        return (OK,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        if gate := self._gate(0):
            return gate
        try:
            s = self.stream(stream)
        except Fault as fault:
            return (fault.code,)
        if s.handle in DEFAULT_STREAMS:
            return (E.cudaErrorInvalidResourceHandle,)
        s.live = False
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        if gate := self._gate(0):
            return gate
        mode = _enum(mode, cudaStreamCaptureMode)
        try:
            s = self.stream(stream)
        except Fault as fault:
            return (fault.code,)
        if s.handle in DEFAULT_STREAMS:
            return (E.cudaErrorStreamCaptureUnsupported,)
        if s.capture is not None:
            return (E.cudaErrorIllegalState,)
        s.capture = Capture(mode)
        return (OK,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        if gate := self._gate(1):
            return gate
        try:
            s = self.stream(stream)
        except Fault as fault:
            return fault.code, None
        capture, s.capture = s.capture, None
        if capture is None:
            return E.cudaErrorIllegalState, None
        if capture.invalidated:
            return E.cudaErrorStreamCaptureInvalidated, None
        handle = self._handle()
        self.graphs[handle] = list(capture.ops)
        return OK, cudaGraph_t(handle)

    def cudaStreamIsCapturing(self, stream):  # noqa: N802
        if gate := self._gate(1):
            return gate
        try:
            s = self.stream(stream)
        except Fault as fault:
            return fault.code, None
        if s.capture is None:
            return OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
        if s.capture.invalidated:
            return OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusInvalidated
        return OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusActive

    def cudaEventCreate(self):  # noqa: N802
        if gate := self._gate(1):
            return gate
        handle = self._handle()
        self.events[handle] = Event(handle)
        return OK, cudaEvent_t(handle)

    def _event(self, event) -> Event:
        e = self.events.get(int(event or 0))
        if e is None or not e.live:
            raise Fault(E.cudaErrorInvalidResourceHandle, f"event {event!r} does not exist")
        return e

    def cudaEventRecord(self, event, stream):  # noqa: N802
        if gate := self._gate(0):
            return gate
        try:
            e, s = self._event(event), self.stream(stream)
        except Fault as fault:
            return (fault.code,)
        if s.capture is not None:
            if s.capture.invalidated:
                return (E.cudaErrorStreamCaptureInvalidated,)
            e.captured, e.stream, e.time_ms = True, s.handle, None  # a dependency marker, not a timestamp
            return (OK,)
        self.clock_ms += 0.0005  # two records are never at the same instant
        e.captured, e.stream, e.seq, e.time_ms = False, s.handle, s.seq, self.clock_ms
        return (OK,)

    def cudaEventSynchronize(self, event):  # noqa: N802
        if gate := self._gate(0):
            return gate
        try:
            e = self._event(event)
        except Fault as fault:
            return (fault.code,)
        if e.captured:
            return (E.cudaErrorCapturedEvent,)
        if err := self.unsafe("cudaEventSynchronize"):
            return (err,)
        if e.stream is not None:
            self._synchronised(self.streams[e.stream], e.seq)
        return (OK,)

    def cudaEventElapsedTime(self, start, end):  # noqa: N802
        if gate := self._gate(1):
            return gate
        try:
            events = self._event(start), self._event(end)
        except Fault as fault:
            return fault.code, None
        if any(e.captured for e in events):
            return E.cudaErrorCapturedEvent, None
        if any(e.time_ms is None for e in events):
            return E.cudaErrorInvalidResourceHandle, None
        if any(self.streams[e.stream].done < e.seq for e in events):
            return E.cudaErrorNotReady, None
        return OK, events[1].time_ms - events[0].time_ms

    def cudaEventDestroy(self, event):  # noqa: N802
        if gate := self._gate(0):
            return gate
        try:
            self._event(event).live = False
        except Fault as fault:
            return (fault.code,)
        return (OK,)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        if gate := self._gate(1):
            return gate
        ops = self.graphs.get(int(graph or 0))
        if ops is None:
            return E.cudaErrorInvalidValue, None
        handle = self._handle()
        self.execs[handle] = list(ops)  # an executable graph is independent of its graph
        return OK, cudaGraphExec_t(handle)

    def cudaGraphLaunch(self, graphExec, stream):  # noqa: N802, N803
        if gate := self._gate(0):
            return gate
        ops = self.execs.get(int(graphExec or 0))
        if ops is None:
            return (E.cudaErrorInvalidValue,)
        try:
            s = self.stream(stream)
        except Fault as fault:
            return (fault.code,)

        def replay(cuda: FakeCuda) -> None:
            for op in ops:
                cuda._execute(op, s)
                if cuda.sticky is not None:
                    return

        return (self.enqueue(s.handle, Op("graph", f"graph 0x{int(graphExec):x}", replay, cost_ms=0.0)),)

    def cudaGraphExecDestroy(self, graphExec):  # noqa: N802, N803
        if gate := self._gate(0):
            return gate
        return (OK,) if self.execs.pop(int(graphExec or 0), None) is not None else (E.cudaErrorInvalidValue,)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        if gate := self._gate(0):
            return gate
        return (OK,) if self.graphs.pop(int(graph or 0), None) is not None else (E.cudaErrorInvalidValue,)


def _enum(value, enum_type):
    """cuda-python reads ``arg.value``: a plain int is a TypeError there, and here."""
    if not isinstance(value, enum_type):
        raise TypeError(f"expected {enum_type.__name__}, got {type(value).__name__} {value!r}")
    return value
