"""The simulated GPU behind the fake cuda-python runtime (``cudart.py``): memory, streams, capture, faults.

``Device`` holds the state and the machinery every call shares: allocations (256-byte aligned, in an
address range no host pointer uses, numpy-backed, never reused, device memory uninitialised: all-ones
bytes, NaN as floats), bounds-checked views of device and
pinned memory, streams with their capture state and their queues of work not yet run (asynchrony,
documented in ``cudart.py``), the sticky-fault rule, the pinned-memory race checks and the per-stream
counters. The
cuda-python names, enums and handle types live here too, so both modules share one definition;
``cudart.FakeCuda`` adds the API calls.
"""

from __future__ import annotations

import bisect
import ctypes
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

ALIGNMENT = 256  # cudaMalloc returns addresses aligned to at least 256 bytes
UNINITIALISED = 0xFF  # the byte a fresh device allocation holds (see _allocate)
DEVICE_BASE = 0x2000_0000_0000  # far below the mmap area and above the heap: no host pointer lands here
DEVICE_SPAN = 1 << 40
DEFAULT_STREAMS = (0, 1, 2)  # NULL, cudaStreamLegacy, cudaStreamPerThread
COUNTER = {"memcpy": "memcpy", "memset": "memset", "kernel": "kernels", "graph": "graph_launches"}


class cudaError_t(IntEnum):  # the names and values of cuda-python (CUDA driver_types.h)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidPitchValue = 12
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
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


class cudaMemcpyKind(IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaStreamCaptureStatus(IntEnum):
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

    def getPtr(self) -> int:
        return self._value

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and int(other) == self._value

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 0x{self._value:x}>"


class cudaStream_t(_Handle):
    pass


class cudaEvent_t(_Handle):
    pass


class cudaGraph_t(_Handle):
    pass


class cudaGraphExec_t(_Handle):
    pass


@dataclass
class cudaDeviceProp:
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int
    integrated: int
    multiProcessorCount: int = 8


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
    ran: int = 0  # operations the device has run (≤ seq): the rest wait in ``queue``
    queue: list = field(default_factory=list)  # (sequence number, Op) not run yet, in stream order


@dataclass
class Event:
    handle: int
    live: bool = True
    stream: int | None = None  # stream of the last record
    seq: int = 0  # that stream's sequence number at the record
    time_ms: float | None = None  # set when the device reaches the record, not when the host makes it
    captured: bool = False  # last recorded inside a capture


@dataclass
class Op:
    """One unit of stream work: a copy, a memset or a kernel (a TensorRT enqueue)."""

    kind: str  # "memcpy", "memset", "kernel", "graph", or "marker" (event records and waits: not counted)
    label: str
    run: object  # callable(Device) -> None; raises Fault
    cost_ms: float = 0.001
    pinned: tuple = ()  # (address, bytes) of pinned host memory the op reads
    pinned_out: tuple = ()  # (address, bytes) of pinned host memory the op writes
    pageable: bool = False  # reads or writes pageable host memory (a copy no capture may hold)


class Device:
    """One simulated GPU's state and shared machinery (the API calls are ``cudart.FakeCuda``'s)."""

    def __init__(
        self,
        name: str = "Fake Orin",
        compute_capability: tuple[int, int] = (8, 7),
        total_memory: int = 8 << 30,
        integrated: bool = True,
    ):
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
        self.pending_writes: list[tuple] = []  # pinned host memory that copies not yet run will overwrite

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
            raise Fault(
                E.cudaErrorInvalidValue,
                f"{what} 0x{ptr:x}+{nbytes} overruns its allocation of "
                f"{alloc.size} bytes at 0x{alloc.base:x} by {over}",
            )
        return alloc.data[offset : offset + nbytes]

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
        """Record ``op`` if ``stream`` is capturing, else queue it: it runs when the host synchronises the
        stream (or an event recorded after it), never before, and always after the stream's earlier work."""
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
            if op.pageable:  # see cudart.py: no graph may hold a copy from or to pageable host memory
                s.capture.invalidated = True
                self.faults.append(f"{op.label} with pageable host memory during stream capture: refused")
                return E.cudaErrorStreamCaptureUnsupported
            s.capture.ops.append(op)
            if op.kind != "marker":
                self.counters[s.handle]["captured"] += 1
            return OK
        if op.kind != "marker":
            self.counters[s.handle][COUNTER[op.kind]] += 1
        s.seq += 1
        s.queue.append((s.seq, op))
        for address, nbytes in op.pinned:  # on a GPU the DMA may read it any time until the stream is synchronised
            self.pending_reads.append((s.handle, s.seq, address, nbytes, ctypes.string_at(address, nbytes)))
        for address, nbytes in op.pinned_out:
            self.pending_writes.append((s.handle, s.seq, address, nbytes, ctypes.string_at(address, nbytes)))
        return OK

    def run_until(self, s: Stream, upto: int | None = None) -> None:
        """Run ``s``'s queued work up to sequence number ``upto`` (all of it by default), in stream order."""
        upto = s.seq if upto is None else upto
        while s.queue and s.queue[0][0] <= upto:
            seq, op = s.queue.pop(0)
            self._execute(op, s)
            s.ran = seq

    def run_all(self) -> None:
        """Run every stream's queued work (a device-wide synchronisation)."""
        for s in list(self.streams.values()):
            self.run_until(s)

    def _execute(self, op: Op, stream: Stream) -> None:
        if self.sticky is not None:  # a context that faulted runs nothing more
            return
        self._land_pinned_writes(op)
        try:
            op.run(self)
        except Fault as fault:
            self.fault(E.cudaErrorIllegalAddress, f"{op.label}: {fault}")
        self.clock_ms += op.cost_ms

    def _land_pinned_writes(self, op: Op) -> None:
        """A copy into pinned memory lands when it runs: a host write there before then is a race it overwrites."""
        for address, nbytes in op.pinned_out:
            for entry in self.pending_writes:
                if entry[2:4] == (address, nbytes):
                    if ctypes.string_at(address, nbytes) != entry[4]:
                        self.faults.append(
                            f"the host wrote pinned memory 0x{address:x} ({nbytes} bytes) that an asynchronous "
                            f"copy into it on stream 0x{entry[0]:x} had not completed"
                        )
                    self.pending_writes.remove(entry)
                    break

    def check_pinned_races(self) -> None:
        """Pinned memory an asynchronous copy reads must keep its contents until the host synchronised the copy."""
        pending = []
        for handle, seq, address, nbytes, snapshot in self.pending_reads:
            if self.streams[handle].done >= seq:
                continue
            if ctypes.string_at(address, nbytes) != snapshot:
                self.faults.append(
                    f"the host modified pinned memory 0x{address:x} ({nbytes} bytes) while an "
                    f"asynchronous copy from it on stream 0x{handle:x} was not yet synchronised"
                )
                continue
            pending.append((handle, seq, address, nbytes, snapshot))
        self.pending_reads = pending

    def unfinished_pinned_writes(self) -> list[tuple[int, int]]:
        """(address, bytes) of pinned memory that queued copies have yet to write: a host read there now gets
        the previous contents. A numpy-backed fake cannot see the read itself; a test sees its stale values."""
        return [(address, nbytes) for _, _, address, nbytes, _ in self.pending_writes]

    def active_captures(self) -> list[Stream]:
        return [s for s in self.streams.values() if s.capture is not None]

    def unsafe(self, call: str) -> cudaError_t | None:
        """A potentially unsafe call: refused (and the capture invalidated) during a non-relaxed capture."""
        strict = [
            s for s in self.active_captures() if s.capture.mode != cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed
        ]
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
            # cudaMalloc leaves memory uninitialised: all-ones bytes read as NaN (float) or -1 (int), so a
            # kernel that reads memory nobody wrote shows up in its outputs.
            data = np.full(padded, UNINITIALISED, np.uint8)
            base = self._next
            self._next += padded + ALIGNMENT  # a gap: an overrun never lands in the next allocation
        else:
            raw = np.zeros(padded + ALIGNMENT, np.uint8)
            shift = -raw.ctypes.data % ALIGNMENT
            data = raw[shift : shift + padded]
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
        """The host waits for ``s`` (up to ``upto``): the queued work runs now, and counts as complete."""
        self.run_until(s, upto)
        s.done = max(s.done, s.seq if upto is None else upto)

    # -- copies --------------------------------------------------------------------------------------------------------

    def _copy_op(
        self, dst: int, src: int, width: int, height: int, dpitch: int, spitch: int, kind: cudaMemcpyKind, label: str
    ) -> Op:
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

        pinned: tuple = ()
        pinned_out: tuple = ()
        staged: bytes | None = None
        pageable = False
        if width and height:
            address(src, extent_src, src_dev, "source")
            address(dst, extent_dst, dst_dev, "destination")
            if not src_dev:
                if self.find(self.pinned, src) is not None:
                    pinned = ((src, extent_src),)
                else:  # pageable: the runtime stages it before returning, so the copy uses these bytes
                    pageable, staged = True, ctypes.string_at(src, extent_src)
            if not dst_dev:
                if self.find(self.pinned, dst) is not None:
                    pinned_out = ((dst, extent_dst),)
                else:
                    pageable = True

        def run(cuda: Device) -> None:
            if not width or not height:
                return
            s_addr = address(src, extent_src, src_dev, "source")
            d_addr = address(dst, extent_dst, dst_dev, "destination")
            if staged is not None:
                s_addr = ctypes.cast(ctypes.c_char_p(staged), ctypes.c_void_p).value or 0
            for row in range(height):
                ctypes.memmove(d_addr + row * dpitch, s_addr + row * spitch, width)

        cost = 0.002 + width * height / 2e7
        return Op("memcpy", label, run, cost, pinned=pinned, pinned_out=pinned_out, pageable=pageable)

    def _gate(self, nvalues: int):
        """The sticky error, shaped like the call's result, if the context is broken (every call starts here)."""
        self.check_pinned_races()
        if self.sticky is None:
            return None
        return (self.sticky,) + (None,) * nvalues
