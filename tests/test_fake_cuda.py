"""The fake cuda-python runtime (tests/fakes/cudart.py): its calling convention, and each CUDA rule broken on
purpose answering with the error the real runtime returns. Also: the product's wrapper (core/cuda.py) on it."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

from tests.fakes.cuda_device import UNINITIALISED
from tests.fakes.cudart import FakeCuda, cudaError_t

E = cudaError_t


@pytest.fixture
def rt(fake_gpu):
    return fake_gpu.cudart


def ok(result):
    """The values of a successful call (cuda-python returns ``(cudaError_t, *values)``)."""
    assert isinstance(result, tuple), f"{result!r} is not a tuple"
    assert result[0] == E.cudaSuccess, result
    return result[1] if len(result) == 2 else result[1:]


def stream(rt):
    return ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))


def upload(rt, ptr, array, s):
    ok(rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, s))


def download(rt, ptr, like, s):
    out = np.empty_like(like)
    ok(rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, s))
    ok(rt.cudaStreamSynchronize(s))
    return out


def begin(rt, s, mode="cudaStreamCaptureModeGlobal"):
    ok(rt.cudaStreamBeginCapture(s, getattr(rt.cudaStreamCaptureMode, mode)))


def status(rt, s):
    return ok(rt.cudaStreamIsCapturing(s)).name.removeprefix("cudaStreamCaptureStatus")


# ---------------------------------------------------------------------------------------------------------------------
# Calling convention and memory


def test_calling_convention_and_aligned_allocations(rt):
    assert rt.cudaDeviceSynchronize() == (E.cudaSuccess,)  # no values: a 1-tuple
    err, ptr = rt.cudaMalloc(1000)
    assert err == E.cudaSuccess and isinstance(ptr, int) and ptr % 256 == 0
    assert ok(rt.cudaMalloc(3)) % 256 == 0
    s = stream(rt)
    assert int(s) != 0 and s.getPtr() == int(s)
    props = ok(rt.cudaGetDeviceProperties(0))
    assert props.name == b"Fake Orin" and (props.major, props.minor) == (8, 7)
    assert rt.cudaGetDeviceProperties(1) == (E.cudaErrorInvalidDevice, None)  # failure: (err, None)
    data = np.arange(250, dtype=np.float32)
    upload(rt, ptr, data, s)
    np.testing.assert_array_equal(download(rt, ptr, data, s), data)


def test_enum_arguments_must_be_enums(rt):
    # cuda-python reads kind.value / mode.value: a plain int fails there too.
    ptr, s = ok(rt.cudaMalloc(64)), stream(rt)
    with pytest.raises(TypeError, match="cudaMemcpyKind"):
        rt.cudaMemcpyAsync(ptr, ptr, 64, 3, s)
    with pytest.raises(TypeError, match="cudaStreamCaptureMode"):
        rt.cudaStreamBeginCapture(s, 0)


def test_use_after_free_overrun_and_wrong_pointer_kind_are_invalid_value(rt):
    s, host = stream(rt), np.zeros(64, np.uint8)
    ptr = ok(rt.cudaMalloc(64))
    htod, dtoh = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    assert rt.cudaMemcpyAsync(ptr, host.ctypes.data, 65, htod, s) == (E.cudaErrorInvalidValue,)  # overrun
    assert rt.cudaMemcpyAsync(ptr + 32, host.ctypes.data, 40, htod, s) == (E.cudaErrorInvalidValue,)
    assert rt.cudaMemcpyAsync(host.ctypes.data, ptr, 64, htod, s) == (E.cudaErrorInvalidValue,)  # swapped kinds
    assert rt.cudaMemcpyAsync(ptr, ptr, 64, dtoh, s) == (E.cudaErrorInvalidValue,)  # device pointer as host
    assert rt.cudaMemsetAsync(ptr, 0, 128, s) == (E.cudaErrorInvalidValue,)
    assert rt.cudaFree(ptr + 256) == (E.cudaErrorInvalidValue,)  # not an allocation's base
    assert rt.cudaFree(ptr) == (E.cudaSuccess,)
    assert rt.cudaFree(ptr) == (E.cudaErrorInvalidValue,)  # double free
    assert rt.cudaMemcpyAsync(ptr, host.ctypes.data, 8, htod, s) == (E.cudaErrorInvalidValue,)  # use after free
    assert rt.cudaMemsetAsync(ptr, 0, 8, s) == (E.cudaErrorInvalidValue,)
    # A new allocation never reuses a freed address, so the freed one stays detectably freed.
    assert ok(rt.cudaMalloc(64)) != ptr
    assert any("freed" in f for f in rt._fake.faults)


def test_2d_copy_checks_pitch_and_every_row(rt):
    s = stream(rt)
    dst, src = ok(rt.cudaMalloc(4 * 16)), ok(rt.cudaMalloc(4 * 8))
    dtod = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    assert rt.cudaMemcpy2DAsync(dst, 4, src, 8, 8, 4, dtod, s) == (E.cudaErrorInvalidPitchValue,)  # width > dpitch
    assert rt.cudaMemcpy2DAsync(dst, 16, src, 8, 8, 5, dtod, s) == (E.cudaErrorInvalidValue,)  # row 5 of src overruns
    values = np.arange(32, dtype=np.uint8)
    upload(rt, src, values, s)
    ok(rt.cudaMemcpy2DAsync(dst, 16, src, 8, 8, 4, dtod, s))
    got = download(rt, dst, np.zeros(64, np.uint8), s).reshape(4, 16)
    np.testing.assert_array_equal(got[:, :8], values.reshape(4, 8))


def test_pinned_host_memory_is_aligned_checked_and_freed_once(rt):
    s, dev = stream(rt), ok(rt.cudaMalloc(256))
    pinned = ok(rt.cudaMallocHost(256))
    assert pinned % 256 == 0
    htod = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    ok(rt.cudaMemcpyAsync(dev, pinned, 256, htod, s))
    assert rt.cudaMemcpyAsync(dev, pinned + 128, 256, htod, s) == (E.cudaErrorInvalidValue,)  # pinned overrun
    assert rt.cudaFree(pinned) == (E.cudaErrorInvalidValue,)  # pinned memory is not device memory
    assert rt.cudaFreeHost(pinned) == (E.cudaSuccess,)
    assert rt.cudaFreeHost(pinned) == (E.cudaErrorInvalidValue,)
    assert rt.cudaMemcpyAsync(dev, pinned, 16, htod, s) == (E.cudaErrorInvalidValue,)  # freed pinned memory


def test_destroyed_or_unknown_handles_are_refused(rt):
    s = stream(rt)
    ok(rt.cudaStreamDestroy(s))
    assert rt.cudaStreamSynchronize(s) == (E.cudaErrorInvalidResourceHandle,)
    assert rt.cudaStreamSynchronize(0x1234) == (E.cudaErrorInvalidResourceHandle,)
    event = ok(rt.cudaEventCreate())
    ok(rt.cudaEventDestroy(event))
    assert rt.cudaEventRecord(event, stream(rt)) == (E.cudaErrorInvalidResourceHandle,)
    assert rt.cudaGraphLaunch(0x4242, stream(rt)) == (E.cudaErrorInvalidValue,)
    assert rt.cudaGraphDestroy(0x4242) == (E.cudaErrorInvalidValue,)


# ---------------------------------------------------------------------------------------------------------------------
# Stream capture


def test_capture_needs_a_non_default_stream_that_is_not_capturing(rt):
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
    assert rt.cudaStreamBeginCapture(0, mode) == (E.cudaErrorStreamCaptureUnsupported,)
    assert rt.cudaStreamBeginCapture(None, mode) == (E.cudaErrorStreamCaptureUnsupported,)
    s = stream(rt)
    assert rt.cudaStreamEndCapture(s) == (E.cudaErrorIllegalState, None)
    begin(rt, s)
    assert rt.cudaStreamBeginCapture(s, mode) == (E.cudaErrorIllegalState,)
    assert status(rt, s) == "Active"
    ok(rt.cudaStreamEndCapture(s))
    assert status(rt, s) == "None"


@pytest.mark.parametrize(
    "call",
    [
        "cudaMalloc",
        "cudaFree",
        "cudaMallocHost",
        "cudaFreeHost",
        "cudaMemcpy",
        "cudaDeviceSynchronize",
        "cudaStreamSynchronize",
        "cudaEventSynchronize",
    ],
)
def test_unsafe_calls_during_global_capture_fail_and_invalidate_it(rt, call):
    s, other = stream(rt), stream(rt)
    dev, pinned, event = ok(rt.cudaMalloc(64)), ok(rt.cudaMallocHost(64)), ok(rt.cudaEventCreate())
    ok(rt.cudaEventRecord(event, other))
    host = np.zeros(64, np.uint8)
    calls = {
        "cudaMalloc": lambda: rt.cudaMalloc(64)[:1],
        "cudaFree": lambda: rt.cudaFree(dev),
        "cudaMallocHost": lambda: rt.cudaMallocHost(64)[:1],
        "cudaFreeHost": lambda: rt.cudaFreeHost(pinned),
        "cudaMemcpy": lambda: rt.cudaMemcpy(dev, host.ctypes.data, 64, rt.cudaMemcpyKind.cudaMemcpyHostToDevice),
        "cudaDeviceSynchronize": rt.cudaDeviceSynchronize,
        "cudaStreamSynchronize": lambda: rt.cudaStreamSynchronize(other),
        "cudaEventSynchronize": lambda: rt.cudaEventSynchronize(event),
    }
    begin(rt, s)
    assert calls[call]() == (E.cudaErrorStreamCaptureUnsupported,)
    assert status(rt, s) == "Invalidated"
    # Further work on the invalidated capture fails, and ending it gives no graph.
    assert rt.cudaMemsetAsync(dev, 0, 64, s) == (E.cudaErrorStreamCaptureInvalidated,)
    assert rt.cudaStreamEndCapture(s) == (E.cudaErrorStreamCaptureInvalidated, None)
    assert calls[call]()[0] in (E.cudaSuccess, E.cudaErrorInvalidValue)  # allowed again once the capture ended


def test_relaxed_capture_allows_unsafe_calls_but_never_syncing_the_capturing_stream(rt):
    s = stream(rt)
    begin(rt, s, "cudaStreamCaptureModeRelaxed")
    ok(rt.cudaMalloc(64))
    assert status(rt, s) == "Active"
    assert rt.cudaStreamSynchronize(s) == (E.cudaErrorStreamCaptureUnsupported,)
    assert status(rt, s) == "Invalidated"


def test_legacy_stream_work_while_a_blocking_stream_captures_is_an_implicit_dependency(rt):
    blocking = ok(rt.cudaStreamCreate())
    dev = ok(rt.cudaMalloc(64))
    begin(rt, blocking)
    assert rt.cudaMemsetAsync(dev, 0, 64, 0) == (E.cudaErrorStreamCaptureImplicit,)
    assert status(rt, blocking) == "Invalidated"


def test_fresh_device_memory_is_not_zero(rt):
    """cudaMalloc does not initialise: a fresh buffer reads as NaN floats, so a kernel reading memory
    nobody wrote (an unzeroed cache) poisons its outputs in CI as it may on a GPU."""
    s = stream(rt)
    dev = ok(rt.cudaMalloc(64))
    assert np.isnan(download(rt, dev, np.zeros(16, np.float32), s)).all()
    assert np.isnan(download(rt, dev, np.zeros(32, np.float16), s)).all()
    ok(rt.cudaMemsetAsync(dev, 0, 64, s))
    assert (download(rt, dev, np.ones(16, np.float32), s) == 0).all()


def test_captured_work_is_recorded_not_executed_and_replays_what_the_buffers_hold_then(rt):
    s = stream(rt)
    src, dst = ok(rt.cudaMalloc(16)), ok(rt.cudaMalloc(16))
    upload(rt, src, np.full(16, 1, np.uint8), s)
    begin(rt, s)
    ok(rt.cudaMemcpyAsync(dst, src, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, s))
    ok(rt.cudaMemsetAsync(src, 7, 4, s))
    graph = ok(rt.cudaStreamEndCapture(s))
    assert (download(rt, dst, np.zeros(16, np.uint8), s) == UNINITIALISED).all()  # nothing ran during the capture
    assert (download(rt, src, np.zeros(16, np.uint8), s) == 1).all()
    exe = ok(rt.cudaGraphInstantiate(graph, 0))
    ok(rt.cudaGraphDestroy(graph))  # the executable graph does not need its graph
    upload(rt, src, np.full(16, 5, np.uint8), s)  # the host changes the input after the capture
    ok(rt.cudaGraphLaunch(exe, s))
    assert (download(rt, dst, np.zeros(16, np.uint8), s) == 5).all()  # the replay read the new contents
    assert list(download(rt, src, np.zeros(16, np.uint8), s)[:5]) == [7, 7, 7, 7, 5]
    ok(rt.cudaGraphExecDestroy(exe))
    assert rt.cudaGraphLaunch(exe, s) == (E.cudaErrorInvalidValue,)


def test_replaying_a_graph_after_its_buffers_were_freed_is_a_sticky_illegal_address(rt):
    s = stream(rt)
    src, dst = ok(rt.cudaMalloc(16)), ok(rt.cudaMalloc(16))
    begin(rt, s)
    ok(rt.cudaMemcpyAsync(dst, src, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, s))
    exe = ok(rt.cudaGraphInstantiate(ok(rt.cudaStreamEndCapture(s)), 0))
    ok(rt.cudaFree(src))
    assert rt.cudaGraphLaunch(exe, s) == (E.cudaSuccess,)  # asynchronous: the launch itself succeeds
    assert rt.cudaStreamSynchronize(s) == (E.cudaErrorIllegalAddress,)
    assert rt.cudaMalloc(16) == (E.cudaErrorIllegalAddress, None)  # the context is unusable from now on
    assert "freed" in rt._fake.faults[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Events and counters


def test_event_timings_are_positive_monotonic_and_need_a_synchronisation(rt):
    s = stream(rt)
    a, b, c = (ok(rt.cudaEventCreate()) for _ in range(3))
    assert rt.cudaEventElapsedTime(a, b) == (E.cudaErrorInvalidResourceHandle, None)  # never recorded
    dev = ok(rt.cudaMalloc(1 << 20))
    ok(rt.cudaEventRecord(a, s))
    ok(rt.cudaMemsetAsync(dev, 0, 1 << 20, s))
    ok(rt.cudaEventRecord(b, s))
    ok(rt.cudaEventRecord(c, s))
    assert rt.cudaEventElapsedTime(a, b) == (E.cudaErrorNotReady, None)  # the host has not waited for it
    ok(rt.cudaEventSynchronize(c))
    ab, bc = ok(rt.cudaEventElapsedTime(a, b)), ok(rt.cudaEventElapsedTime(b, c))
    assert ab > 0 and bc > 0 and ok(rt.cudaEventElapsedTime(a, c)) == pytest.approx(ab + bc)


def test_an_event_recorded_during_capture_cannot_be_synchronised_or_timed(rt):
    s = stream(rt)
    start, end = ok(rt.cudaEventCreate()), ok(rt.cudaEventCreate())
    ok(rt.cudaEventRecord(start, s))
    begin(rt, s)
    ok(rt.cudaEventRecord(end, s))
    ok(rt.cudaStreamEndCapture(s))
    assert rt.cudaEventSynchronize(end) == (E.cudaErrorCapturedEvent,)
    assert rt.cudaEventElapsedTime(start, end) == (E.cudaErrorCapturedEvent, None)


def test_counters_count_host_launches_per_stream_not_replays(rt):
    s, other = stream(rt), stream(rt)
    dev = ok(rt.cudaMalloc(64))
    ok(rt.cudaMemsetAsync(dev, 0, 64, s))
    begin(rt, s)
    ok(rt.cudaMemsetAsync(dev, 1, 64, s))
    ok(rt.cudaMemsetAsync(dev, 2, 64, s))
    exe = ok(rt.cudaGraphInstantiate(ok(rt.cudaStreamEndCapture(s)), 0))
    for _ in range(3):
        ok(rt.cudaGraphLaunch(exe, s))
    fake = rt._fake
    assert dict(fake.counters[int(s)]) == {"memset": 1, "captured": 2, "graph_launches": 3}
    assert fake.launches(s) == 4 and fake.launches(other) == 0


# ---------------------------------------------------------------------------------------------------------------------
# The product's wrapper on the fake


def test_product_wrapper_round_trip_and_errors(fake_gpu):
    from imagefolder.core import cuda

    s = cuda.Stream()
    array = cuda.DeviceArray((3, 5), np.float32)
    value = np.arange(15, dtype=np.float32).reshape(3, 5)
    array.upload(value, s)
    np.testing.assert_array_equal(array.download(s), value)
    assert cuda.device_properties() == {
        "name": "Fake Orin",
        "compute_capability": "8.7",
        "total_memory": 8 << 30,
        "integrated": True,
    }
    ptr = array.ptr
    array.free()
    with pytest.raises(cuda.CudaError, match="cudaErrorInvalidValue"):
        cuda.memcpy_dtoh_async(np.empty(15, np.float32), ptr, s)  # use after free
    handle = s.handle
    s.destroy()
    with pytest.raises(cuda.CudaError, match="cudaErrorInvalidResourceHandle"):
        cuda.check(fake_gpu.cudart.cudaStreamSynchronize(handle))


def test_product_counts_the_launches_the_device_counts(fake_gpu):
    from imagefolder.core import cuda

    s = cuda.Stream()
    array = cuda.DeviceArray((64,), np.uint8)
    pinned = cuda.PinnedHostBuffer(64)
    array.zero(s)
    graph = cuda.CudaGraph()
    graph.begin(s)
    cuda.memcpy_async(array.ptr, pinned.ptr, 64, "htod", s)  # recorded, not launched
    cuda.memcpy2d_dtod_async(array.ptr, 8, array.ptr + 32, 8, 4, 4, s)
    graph.end(s)
    assert s.launches == 1 and not s.capturing
    for _ in range(3):
        graph.launch(s)
    s.synchronize()
    assert s.launches == fake_gpu.cuda.launches(s.ptr) == 4
    graph.destroy()
    pinned.free()
    array.free()
    cuda.set_device(0)
    with pytest.raises(cuda.CudaError, match="cudaErrorInvalidDevice"):
        cuda.set_device(1)


def test_product_falls_back_to_cuda_cudart(fake_gpu, monkeypatch):
    from imagefolder.core import cuda

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # cuda-python before 12.6: only cuda.cudart
    monkeypatch.setattr(cuda, "_cudart", None)
    assert cuda.cudart() is fake_gpu.cudart
    assert cuda.device_properties()["name"] == "Fake Orin"


def test_each_fake_gpu_is_its_own_device():
    a, b = FakeCuda(), FakeCuda("Other", (9, 0))
    assert a.cudaMalloc(256)[1] == b.cudaMalloc(256)[1]  # same simulated address space, separate devices
    assert b.cudaGetDeviceProperties(0)[1].major == 9


def test_modifying_pinned_memory_before_its_copy_was_synchronised_is_a_race(rt):
    s, dev = stream(rt), ok(rt.cudaMalloc(64))
    pinned = ok(rt.cudaMallocHost(64))
    host = np.frombuffer((ctypes.c_uint8 * 64).from_address(pinned), np.uint8)
    htod = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    host[:] = 1
    ok(rt.cudaMemcpyAsync(dev, pinned, 64, htod, s))
    ok(rt.cudaStreamSynchronize(s))
    host[:] = 2  # fine: the copy is known to be complete
    ok(rt.cudaMemcpyAsync(dev, pinned, 64, htod, s))
    assert not rt._fake.faults
    host[:] = 3  # the DMA may not have read it yet
    ok(rt.cudaStreamSynchronize(s))
    assert "modified pinned memory" in rt._fake.faults[-1]
    pageable = np.ones(64, np.uint8)
    ok(rt.cudaMemcpyAsync(dev, pageable.ctypes.data, 64, htod, s))
    pageable[:] = 0  # pageable memory was staged before cudaMemcpyAsync returned
    ok(rt.cudaStreamSynchronize(s))
    assert len(rt._fake.faults) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Asynchrony: queued work runs when the host waits for it, in stream order; streams meet only through events


def pinned_array(rt, nbytes):
    ptr = ok(rt.cudaMallocHost(nbytes))
    return ptr, np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), np.uint8)


def test_queued_work_runs_at_synchronisation_and_an_early_read_sees_the_previous_contents(rt):
    s, dev = stream(rt), ok(rt.cudaMalloc(64))
    src, host_in = pinned_array(rt, 64)
    dst, host_out = pinned_array(rt, 64)
    host_in[:], host_out[:] = 9, 1
    ok(rt.cudaMemcpyAsync(dev, src, 64, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, s))
    ok(rt.cudaMemsetAsync(dev, 4, 8, s))  # after the upload, in stream order
    ok(rt.cudaMemcpyAsync(dst, dev, 64, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, s))
    assert (host_out == 1).all()  # read before the stream was synchronised: the previous image
    assert rt._fake.unfinished_pinned_writes() == [(dst, 64)]
    ok(rt.cudaStreamSynchronize(s))
    assert list(host_out[:10]) == [4] * 8 + [9, 9] and not rt._fake.unfinished_pinned_writes()


def test_a_host_write_into_pinned_memory_a_queued_copy_overwrites_is_a_race(rt):
    s, dev = stream(rt), ok(rt.cudaMalloc(64))
    dst, host_out = pinned_array(rt, 64)
    ok(rt.cudaMemsetAsync(dev, 3, 64, s))
    ok(rt.cudaMemcpyAsync(dst, dev, 64, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, s))
    host_out[:] = 7
    ok(rt.cudaStreamSynchronize(s))
    assert (host_out == 3).all() and "had not completed" in rt._fake.faults[-1]


def test_two_streams_are_ordered_only_through_an_event(rt):
    a, b, dev, out = stream(rt), stream(rt), ok(rt.cudaMalloc(16)), ok(rt.cudaMalloc(16))
    dtod = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    ok(rt.cudaMemsetAsync(dev, 0, 16, a))
    ok(rt.cudaStreamSynchronize(a))
    ok(rt.cudaMemsetAsync(dev, 5, 16, a))
    ok(rt.cudaMemcpyAsync(out, dev, 16, dtod, b))  # no event: b does not wait for a
    ok(rt.cudaStreamSynchronize(b))
    assert (download(rt, out, np.zeros(16, np.uint8), b) == 0).all()
    event = ok(rt.cudaEventCreate())
    ok(rt.cudaMemsetAsync(dev, 6, 16, a))
    ok(rt.cudaEventRecord(event, a))
    ok(rt.cudaStreamWaitEvent(b, event, 0))
    ok(rt.cudaMemcpyAsync(out, dev, 16, dtod, b))
    assert (download(rt, out, np.zeros(16, np.uint8), b) == 6).all()  # b waited for a's memset
    assert rt._fake.streams[int(a)].queue == []


def test_event_times_exist_only_once_the_device_reached_the_records(rt):
    s, dev = stream(rt), ok(rt.cudaMalloc(1 << 20))
    start, end = ok(rt.cudaEventCreate()), ok(rt.cudaEventCreate())
    ok(rt.cudaEventRecord(start, s))
    ok(rt.cudaMemsetAsync(dev, 0, 1 << 20, s))
    ok(rt.cudaEventRecord(end, s))
    assert rt.cudaEventElapsedTime(start, end)[0] == E.cudaErrorNotReady
    ok(rt.cudaEventSynchronize(end))
    assert ok(rt.cudaEventElapsedTime(start, end)) > 0


def test_a_fault_surfaces_at_the_synchronisation_that_runs_the_work(rt):
    s, dev = stream(rt), ok(rt.cudaMalloc(16))
    ok(rt.cudaMemsetAsync(dev, 0, 16, s))
    ok(rt.cudaFree(dev))  # cudaFree waits for the device: the memset ran before the free
    assert rt._fake.sticky is None
    ok(rt.cudaStreamSynchronize(s))


@pytest.mark.parametrize("direction", ["htod", "dtoh"])
def test_pageable_host_memory_cannot_be_captured(rt, direction):
    """CUDA stages pageable memory through a driver buffer at the call (a synchronous step no graph can replay);
    PyTorch refuses such copies at capture for the same reason (pytorch/pytorch#172156). Pinned memory is fine."""
    s, dev = stream(rt), ok(rt.cudaMalloc(64))
    pageable = np.zeros(64, np.uint8)
    pinned, _ = pinned_array(rt, 64)
    kind = getattr(rt.cudaMemcpyKind, "cudaMemcpyHostToDevice" if direction == "htod" else "cudaMemcpyDeviceToHost")
    dst, src = (dev, pageable.ctypes.data) if direction == "htod" else (pageable.ctypes.data, dev)
    begin(rt, s)
    ok(rt.cudaMemcpyAsync(*((dev, pinned) if direction == "htod" else (pinned, dev)), 64, kind, s))
    assert rt.cudaMemcpyAsync(dst, src, 64, kind, s) == (E.cudaErrorStreamCaptureUnsupported,)
    assert status(rt, s) == "Invalidated"
    assert rt.cudaStreamEndCapture(s) == (E.cudaErrorStreamCaptureInvalidated, None)
    assert "pageable host memory during stream capture" in rt._fake.faults[-1]
