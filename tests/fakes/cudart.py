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
freed. A fresh device allocation holds all-ones bytes (NaN as floats, -1 as ints), not zeros: the real
cudaMalloc does not initialise, and code that reads memory it never wrote must fail here too.
Every copy, memset and kernel access is bounds-checked against a live allocation (or a live
pinned host allocation). Host pointers outside the pinned table are treated as pageable process
memory and accessed with ctypes, as the real runtime would.

Asynchrony: each stream keeps a queue. Enqueued work (copies, memsets, TensorRT kernels, graph
launches, event records) runs only when the host waits for it (``cudaStreamSynchronize``,
``cudaEventSynchronize`` up to the event's record, ``cudaDeviceSynchronize``, a synchronous
``cudaMemcpy``, ``cudaFree`` and ``cudaFreeHost``, which wait for the device as the real ones do, a
copy into pageable memory, which returns once the copy completed), and then in stream order. Two
streams are ordered only through an event (``cudaStreamWaitEvent``); nothing else makes one wait for
the other. So a host read of pinned memory that a queued copy writes returns the previous contents,
as on a GPU that has not caught up (``unfinished_pinned_writes`` lists such memory; the read itself
is invisible to a numpy-backed fake, the stale values are what a test sees), and a host write there
before the copy lands is recorded in ``faults``. Work of a graph launch runs, op by op, when the
launch is reached. Timings come from a simulated device clock advanced as work runs: an event's time
is set when the device reaches its record, monotonic, strictly positive between two records.

Rules enforced, each with the error the real runtime returns (the CUDA Programming Guide, section
"Prohibited and Unhandled Operations" of CUDA Graphs / stream capture, and the error table quoted in
NVIDIA/cuda-python PR #458):

- capture cannot begin on the legacy default stream (``cudaErrorStreamCaptureUnsupported``), nor on a
  stream already capturing (``cudaErrorIllegalState``); ending a capture on a stream that is not
  capturing is ``cudaErrorIllegalState``. The rules are in cuda-python's docstring of
  ``cudaStreamBeginCapture``; these three codes are not named there and follow HIP, which mirrors CUDA
  (ROCm clr ``hip_graph.cpp``) [*];
- while a capture in global or thread-local mode is active (this fake is single-threaded, so the two
  coincide), "potentially unsafe" calls return ``cudaErrorStreamCaptureUnsupported`` and invalidate the
  capture. ``cudaMalloc`` is NVIDIA's own example (cuda-python docstring of
  ``cudaThreadExchangeStreamCaptureMode``); ``cudaFree``, ``cudaMallocHost``, ``cudaFreeHost``,
  synchronous ``cudaMemcpy``, ``cudaDeviceSynchronize``, ``cudaStreamSynchronize`` and
  ``cudaEventSynchronize`` follow the Programming Guide ("It is invalid to synchronize or query the
  execution status of a stream which is being captured ... or a broader handle ... such as a device"),
  pytorch/pytorch#146924 (event queries need relaxed mode) and HIP's checks [*]. Synchronising the
  capturing stream itself is refused in every mode. Work enqueued on an invalidated
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
  ``cudaMemcpyAsync`` before it returns, so it may change at once ("API synchronization behavior" of the
  CUDA Runtime API: pageable host → device is copied to a staging buffer immediately; device →
  pageable host returns once the copy has completed);
- a copy from or to pageable host memory enqueued during a capture is refused with
  ``cudaErrorStreamCaptureUnsupported`` and invalidates the capture. CUDA's documentation names no such
  rule (the memcpy-node restrictions of ``cudaGraphAddMemcpyNode`` concern managed memory only), and a
  real capture may record the copy: eager, pageable memory is staged or waited for at the call (above),
  which a replay cannot repeat, and nothing keeps the memory alive for later replays. PyTorch refuses
  these copies at capture for that reason (pytorch/pytorch#172156: "the CPU tensor must be pinned for
  the operation to be captured correctly"; silent garbage otherwise); the fake does the same, stricter
  than CUDA may be [*];
- a fault while work *executes* (a kernel touching freed or too little memory, a replayed copy whose
  buffer is gone) is the sticky ``cudaErrorIllegalAddress``: every later call returns it, as a CUDA
  context is unusable after one.

[*] Not confirmed in an NVIDIA source (no GPU was available to try): where a code is marked so, the
rule is documented but the exact error code is inferred.

Counters: ``FakeCuda.counters[stream]`` counts what the host enqueued outside captures on each
stream (``kernels``, ``memcpy``, ``memset``, ``graph_launches``); ``FakeCuda.launches(stream)`` sums
them. Captured work is counted under ``captured`` and replayed work is not counted again.
"""

from __future__ import annotations

import types

from tests.fakes.cuda_device import (
    DEFAULT_STREAMS,
    OK,
    Capture,
    Device,
    E,
    Event,
    Fault,
    Op,
    Stream,
    cudaDeviceProp,
    cudaError_t,
    cudaEvent_t,
    cudaGraph_t,
    cudaGraphExec_t,
    cudaMemcpyKind,
    cudaStream_t,
    cudaStreamCaptureMode,
    cudaStreamCaptureStatus,
)

__all__ = ["DEFAULT_STREAMS", "OK", "Fault", "FakeCuda", "Op", "cudaError_t"]  # what the fake TensorRT imports


class FakeCuda(Device):
    """One simulated GPU with cuda-python's runtime calls. ``module()`` gives the module bound to it."""

    def module(self, name: str = "cuda.bindings.runtime") -> types.ModuleType:
        """A module with cuda-python's names, bound to this device."""
        module = types.ModuleType(name, "fake cuda-python runtime (tests/fakes/cudart.py)")
        for attr in dir(self):
            if attr.startswith("cuda"):
                setattr(module, attr, getattr(self, attr))
        for obj in (
            cudaError_t,
            cudaMemcpyKind,
            cudaStreamCaptureMode,
            cudaStreamCaptureStatus,
            cudaStream_t,
            cudaEvent_t,
            cudaGraph_t,
            cudaGraphExec_t,
            cudaDeviceProp,
        ):
            setattr(module, obj.__name__, obj)
        module.cudaStreamDefault, module.cudaStreamNonBlocking = 0, 1
        module.cudaStreamLegacy, module.cudaStreamPerThread = 1, 2
        module._fake = self
        return module

    def cudaGetErrorName(self, error):
        return OK, E(int(error)).name.encode()

    def cudaGetErrorString(self, error):
        return OK, E(int(error)).name.encode()

    def cudaGetDeviceCount(self):
        return self._gate(1) or (OK, 1)

    def cudaSetDevice(self, device):
        if gate := self._gate(0):
            return gate
        return (OK,) if int(device) == 0 else (E.cudaErrorInvalidDevice,)  # one simulated GPU

    def cudaGetDeviceProperties(self, device):
        if gate := self._gate(1):
            return gate
        if int(device) != 0:
            return E.cudaErrorInvalidDevice, None
        major, minor = self.compute_capability
        return OK, cudaDeviceProp(self.name.encode(), major, minor, self.total_memory, int(self.integrated))

    def cudaDeviceSynchronize(self):
        if gate := self._gate(0):
            return gate
        if err := self.unsafe("cudaDeviceSynchronize"):
            return (err,)
        self._synchronise_all()
        return (self.sticky or OK,)

    def _synchronise_all(self) -> None:
        for s in list(self.streams.values()):
            self._synchronised(s)

    def cudaMalloc(self, size):
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

    def cudaFree(self, devPtr):
        if gate := self._gate(0):
            return gate
        if err := self.unsafe("cudaFree"):
            return (err,)
        if int(devPtr) == 0:
            return (OK,)
        self._synchronise_all()  # cudaFree waits for the device to go idle (an implicit synchronisation)
        if self.sticky is not None:
            return (self.sticky,)
        return (self._free(self.device, int(devPtr)),)

    def cudaMallocHost(self, size):
        if gate := self._gate(1):
            return gate
        if err := self.unsafe("cudaMallocHost"):
            return err, None
        return OK, self._allocate(size, self.pinned, device=False).base

    def cudaFreeHost(self, ptr):
        if gate := self._gate(0):
            return gate
        if err := self.unsafe("cudaFreeHost"):
            return (err,)
        self._synchronise_all()  # as cudaFree
        if self.sticky is not None:
            return (self.sticky,)
        return (self._free(self.pinned, int(ptr)),)

    def cudaMemcpy(self, dst, src, count, kind):
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
        if err == OK:  # synchronous: returns once the copy (and the legacy stream, which waits for all) is done
            self._synchronise_all()
        return (self.sticky or err,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        return self.cudaMemcpy2DAsync(dst, count, src, count, count, 1, kind, stream)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        if gate := self._gate(0):
            return gate
        kind = _enum(kind, cudaMemcpyKind)
        if int(width) > int(dpitch) or int(width) > int(spitch):
            return (E.cudaErrorInvalidPitchValue,)
        try:
            self.stream(stream)
            op = self._copy_op(
                int(dst),
                int(src),
                int(width),
                int(height),
                int(dpitch),
                int(spitch),
                kind,
                f"cudaMemcpy2DAsync({kind.name})",
            )
        except Fault as fault:
            self.faults.append(str(fault))
            return (fault.code,)
        err = self.enqueue(stream, op)
        s = self.stream(stream)
        into_pageable = op.pageable and not op.pinned_out and not self.is_device_pointer(int(dst))
        if err == OK and into_pageable and s.capture is None:
            # "the function will return only once the copy has completed"
            self._synchronised(s)
            return (self.sticky or OK,)
        return (err,)

    def cudaMemsetAsync(self, devPtr, value, count, stream):
        if gate := self._gate(0):
            return gate
        ptr, count, value = int(devPtr), int(count), int(value) & 0xFF

        def run(cuda: Device) -> None:
            cuda.device_view(ptr, count, "memset destination")[:] = value

        try:
            self.stream(stream)
            self.device_view(ptr, count, "memset destination")
        except Fault as fault:
            self.faults.append(str(fault))
            return (fault.code,)
        return (self.enqueue(stream, Op("memset", "cudaMemsetAsync", run)),)

    def cudaStreamCreateWithFlags(self, flags):
        if gate := self._gate(1):
            return gate
        if int(flags) not in (0, 1):
            return E.cudaErrorInvalidValue, None
        handle = self._handle()
        self.streams[handle] = Stream(handle, int(flags))
        return OK, cudaStream_t(handle)

    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamSynchronize(self, stream):
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
        if s.handle in DEFAULT_STREAMS:  # the legacy stream synchronises with every blocking stream: all of them
            self._synchronise_all()
        self._synchronised(s)
        return (self.sticky or OK,)

    def cudaStreamWaitEvent(self, stream, event, flags=0):
        """Later work on ``stream`` waits for ``event``'s record: the only order between two streams."""
        if gate := self._gate(0):
            return gate
        try:
            s, e = self.stream(stream), self._event(event)
        except Fault as fault:
            return (fault.code,)
        if s.capture is not None:  # fork/join capture across streams is not modelled
            return (E.cudaErrorStreamCaptureUnsupported,)
        if e.stream is None or e.captured:
            return (OK,)  # an event never recorded is complete
        source, upto = self.streams[e.stream], e.seq
        return (self.enqueue(s.handle, Op("marker", "cudaStreamWaitEvent", lambda cuda: cuda.run_until(source, upto))),)

    def cudaStreamDestroy(self, stream):
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

    def cudaStreamBeginCapture(self, stream, mode):
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

    def cudaStreamEndCapture(self, stream):
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

    def cudaStreamIsCapturing(self, stream):
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

    def cudaEventCreate(self):
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

    def cudaEventRecord(self, event, stream):
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

        def reached(cuda: FakeCuda) -> None:
            cuda.clock_ms += 0.0005  # two records are never at the same instant
            e.time_ms = cuda.clock_ms

        e.captured, e.stream, e.time_ms = False, s.handle, None
        err = self.enqueue(s.handle, Op("marker", "cudaEventRecord", reached, cost_ms=0.0))
        e.seq = s.seq
        return (err,)

    def cudaEventSynchronize(self, event):
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
        return (self.sticky or OK,)

    def cudaEventElapsedTime(self, start, end):
        if gate := self._gate(1):
            return gate
        try:
            events = self._event(start), self._event(end)
        except Fault as fault:
            return fault.code, None
        if any(e.captured for e in events):
            return E.cudaErrorCapturedEvent, None
        if any(e.stream is None for e in events):
            return E.cudaErrorInvalidResourceHandle, None
        if any(self.streams[e.stream].done < e.seq or e.time_ms is None for e in events):
            return E.cudaErrorNotReady, None
        return OK, events[1].time_ms - events[0].time_ms

    def cudaEventDestroy(self, event):
        if gate := self._gate(0):
            return gate
        try:
            self._event(event).live = False
        except Fault as fault:
            return (fault.code,)
        return (OK,)

    def cudaGraphInstantiate(self, graph, flags):
        if gate := self._gate(1):
            return gate
        ops = self.graphs.get(int(graph or 0))
        if ops is None:
            return E.cudaErrorInvalidValue, None
        handle = self._handle()
        self.execs[handle] = list(ops)  # an executable graph is independent of its graph
        return OK, cudaGraphExec_t(handle)

    def cudaGraphLaunch(self, graphExec, stream):
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

        label = f"graph 0x{int(graphExec):x}"
        reads = tuple(r for op in ops for r in op.pinned)
        writes = tuple(w for op in ops for w in op.pinned_out)
        return (self.enqueue(s.handle, Op("graph", label, replay, cost_ms=0.0, pinned=reads, pinned_out=writes)),)

    def cudaGraphExecDestroy(self, graphExec):
        if gate := self._gate(0):
            return gate
        return (OK,) if self.execs.pop(int(graphExec or 0), None) is not None else (E.cudaErrorInvalidValue,)

    def cudaGraphDestroy(self, graph):
        if gate := self._gate(0):
            return gate
        return (OK,) if self.graphs.pop(int(graph or 0), None) is not None else (E.cudaErrorInvalidValue,)


def _enum(value, enum_type):
    """cuda-python reads ``arg.value``: a plain int is a TypeError there, and here."""
    if not isinstance(value, enum_type):
        raise TypeError(f"expected {enum_type.__name__}, got {type(value).__name__} {value!r}")
    return value
