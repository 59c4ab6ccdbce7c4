"""One GPU check for a machine with PyTorch and CUDA but no TensorRT (docs/device-check.md says how to run it).

(a) ``imagefolder/core/cuda.py`` on the device through cuda-python: device and pinned allocations,
    copies (1D and 2D), CUDA events, the capture and replay of a small copy-only graph with new host
    data at each replay, launch counting, and the error path (a bad free raises ``CudaError`` and
    leaves the context usable).
(b) The torch backend (``runtime/backends/torch_backend.py``) at a preset's width with random weights,
    per dtype and batch: eager generations, then the whole generation captured as one
    ``torch.cuda.CUDAGraph`` and replayed, with tokens eager == graph for two alternating seeds (a
    replay that read stale inputs would repeat the other seed's tokens), and the time per image
    against the GPU's floor: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per image, from the
    model's FLOPs and bytes (``generation_cost``; the arithmetic is in docs/device-check.md).

Writes ``OUT/device-check.json`` (``--out``, default ``$OUT`` or ``device-check-out``), prints a table,
and exits 1 if any check failed. ``--device cpu --preset tiny`` runs (b) on the CPU (eager only; (a)
is skipped) so CI can smoke-test the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing it (the device machine)
    sys.path.insert(0, str(ROOT))

from imagefolder.io import atomic_write_text  # noqa: E402

PEAK_TFLOPS = 790.0  # H200, dense bf16/fp16 tensor-core throughput used as the floor (the task's figure)
PEAK_TBPS = 4.8  # H200 HBM3e bandwidth, TB/s
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _check(results: list[dict], name: str, run) -> None:
    """Run one check, record ok/detail; an exception fails the check, not the script."""
    try:
        detail = run()
        results.append({"check": name, "ok": True, "detail": detail})
    except Exception as err:  # a failed check is data for the report
        results.append({"check": name, "ok": False, "detail": f"{type(err).__name__}: {err}"})


# ---------------------------------------------------------------------------------------------------------------------
# (a) imagefolder.core.cuda on the device


def check_cuda() -> list[dict]:
    """Every part of ``core/cuda.py`` the TensorRT backend uses, on device 0."""
    from imagefolder.core import cuda

    results: list[dict] = []
    rng = np.random.default_rng(0)
    stream = cuda.Stream()

    def device() -> str:
        props = cuda.device_properties()
        return f"{props['name']}, compute {props['compute_capability']}, {props['total_memory'] / 2**30:.0f} GiB"

    def roundtrip() -> str:
        value = rng.standard_normal((64, 33)).astype(np.float32)
        array = cuda.DeviceArray(value.shape, value.dtype)
        array.upload(value, stream)
        np.testing.assert_array_equal(array.download(stream), value)
        array.free()
        return "pageable upload/download of 64×33 float32"

    def pinned_and_2d() -> str:
        rows, width, pitch = 16, 40, 64
        host = cuda.PinnedHostBuffer(rows * pitch)
        back = cuda.PinnedHostBuffer(rows * width)
        src, dst = cuda.DeviceBuffer(rows * pitch), cuda.DeviceBuffer(rows * width)
        host.array[:] = rng.integers(0, 256, rows * pitch, dtype=np.uint8)
        cuda.memcpy_async(src.ptr, host.ptr, rows * pitch, "htod", stream)
        cuda.memcpy2d_dtod_async(dst.ptr, width, src.ptr, pitch, width, rows, stream)  # drop each row's tail
        cuda.memcpy_async(back.ptr, dst.ptr, rows * width, "dtoh", stream)
        stream.synchronize()
        np.testing.assert_array_equal(back.array.reshape(rows, width), host.array.reshape(rows, pitch)[:, :width])
        for buffer in (src, dst, host, back):
            buffer.free()
        return f"pinned htod, 2D dtod ({rows} rows of {width} of {pitch} bytes), pinned dtoh"

    def events() -> str:
        timer = cuda.EventTimer(stream)
        array = cuda.DeviceArray((1 << 24,), np.uint8)
        timer.start("memset 16 MiB")
        array.zero(stream)
        timer.stop("memset 16 MiB")
        ((label, ms),) = timer.collect()
        array.free()
        timer.destroy()
        assert ms > 0, ms
        return f"{label}: {ms:.4f} ms"

    def graph() -> str:
        n = 4096
        host, out = cuda.PinnedHostBuffer(n), cuda.PinnedHostBuffer(n)
        a, b = cuda.DeviceBuffer(n), cuda.DeviceBuffer(n)
        g = cuda.CudaGraph()
        g.begin(stream)
        cuda.memcpy_async(a.ptr, host.ptr, n, "htod", stream)
        cuda.memcpy_async(b.ptr, a.ptr, n, "dtod", stream)
        cuda.memcpy_async(out.ptr, b.ptr, n, "dtoh", stream)
        g.end(stream)
        launches = stream.launches
        for _ in range(3):  # each replay copies what the pinned buffer holds now
            host.array[:] = rng.integers(0, 256, n, dtype=np.uint8)
            g.launch(stream)
            stream.synchronize()
            np.testing.assert_array_equal(out.array, host.array)
        assert stream.launches - launches == 3, stream.launches - launches
        g.destroy()
        for buffer in (a, b, host, out):
            buffer.free()
        return "captured htod → dtod → dtoh, 3 replays with new host data, 1 launch each"

    def bad_free() -> str:
        buffer = cuda.DeviceBuffer(256)
        ptr = buffer.ptr
        buffer.free()
        try:
            cuda.check(cuda.cudart().cudaFree(ptr))
        except cuda.CudaError as err:
            cuda.DeviceBuffer(256).free()  # not sticky: the context still works
            return f"freeing a freed pointer: {err}"
        raise AssertionError("cudaFree of a freed pointer succeeded")

    for name, run in (
        ("cuda device", device),
        ("cuda alloc + pageable copies", roundtrip),
        ("cuda pinned + 2D copies", pinned_and_2d),
        ("cuda events", events),
        ("cuda graph capture/replay", graph),
        ("cuda error path", bad_free),
    ):
        _check(results, name, run)
    stream.destroy()
    return results


# ---------------------------------------------------------------------------------------------------------------------
# (b) the torch backend, eager and as one CUDA graph


def _linear_weights(module) -> int:
    """Weight elements of every nn.Linear in ``module``: multiply-adds per token through it."""
    import torch.nn as nn

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def generation_cost(tokenizer, generator, batch: int, itemsize: int) -> dict:
    """FLOPs and bytes of one generation of ``batch`` images (N = 2B rows under CFG), as implemented.

    FLOPs (2 per multiply-add): per step si with q = pn² tokens per row, the trunk's linears (qkv,
    proj, fc1, fc2 of every block) and the head, 2·N·q·(their weights); attention over the whole cache
    (masked) plus the scale's own keys, 4·N·q·(P + q)·C per block; the prefill's AdaLN linears once per
    row; the decoder ViT's linears over its T = 2 + G² + K² tokens and its attention 4·B·T²·W per block.
    Bytes (a floor: activations assumed to stay on chip): the trunk and head weights once per step,
    the AdaLN and decoder weights once, and each step reads the whole K and V cache (L, N, H, P, D).
    """
    gcfg, tcfg = generator.cfg, tokenizer.cfg
    n, c, layers, positions = 2 * batch, gcfg.width, gcfg.depth, gcfg.positions
    block_ada = sum(_linear_weights(b.ada_lin) for b in generator.blocks)
    ada = block_ada + _linear_weights(generator.head_nm)  # the head's norm holds only its AdaLN linear
    trunk = sum(_linear_weights(b) for b in generator.blocks) - block_ada
    step_weights = trunk + _linear_weights(generator.head) + _linear_weights(generator.word_embed)
    flops = 2 * n * ada
    for pn in gcfg.scales:
        q = pn * pn
        flops += 2 * n * q * step_weights + 4 * n * q * (positions + q) * c * layers
    decoder = tokenizer.decoder
    tokens = 2 + tcfg.grid**2 + tcfg.num_latents
    flops += 2 * batch * tokens * _linear_weights(decoder) + 4 * batch * tokens**2 * tcfg.width * tcfg.depth
    step_params = sum(p.numel() for p in generator.parameters()) - ada
    decoder_params = sum(p.numel() for p in decoder.parameters()) + sum(
        p.numel() for p in tokenizer.post_quant_conv.parameters()
    )
    cache = 2 * layers * n * positions * c  # K and V
    nbytes = itemsize * (len(gcfg.scales) * (step_params + cache) + ada + decoder_params)
    return {"flops": float(flops), "bytes": float(nbytes)}


def floor_ms(cost: dict, batch: int) -> dict:
    compute = cost["flops"] / (PEAK_TFLOPS * 1e12) * 1e3
    memory = cost["bytes"] / (PEAK_TBPS * 1e12) * 1e3
    return {"compute_ms": compute / batch, "memory_ms": memory / batch, "floor_ms": max(compute, memory) / batch}


def _models(preset: str, device: str, seed: int = 0):
    import torch

    from imagefolder.configs import from_name
    from imagefolder.models.generator import Generator
    from imagefolder.models.tokenizer import Tokenizer

    config = from_name(preset)
    tok_cfg = dataclasses.replace(config.tokenizer, with_teacher=False)  # no DINOv2 teacher: not used here
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where they run: seconds at d17 on a GPU, minutes on a CPU
        tokenizer, generator = Tokenizer(tok_cfg).eval(), Generator(config.generator).eval()
        for ada in [b.ada_lin[-1] for b in generator.blocks] + [generator.head_nm.ada_lin[-1]]:
            torch.nn.init.normal_(ada.weight, std=0.02)  # every path matters, as in tests/models.py
    return tokenizer, generator


def _timed(backend, session, labels, params) -> tuple[float, np.ndarray]:
    """Milliseconds of one generation (host, end to end: it ends synchronised) and its indices."""
    from imagefolder.runtime.loop import generate

    start = time.perf_counter()
    result = generate(backend, labels, params, session=session)
    return (time.perf_counter() - start) * 1e3, result.indices


def check_torch(preset: str, device: str, batches: list[int], dtypes: list[str], runs: int) -> list[dict]:
    """Eager and whole-generation CUDA-graph runs of the torch backend; tokens compared, time per image vs floor."""
    import torch

    from imagefolder.core.sampler import default_candidates
    from imagefolder.core.schedule import SamplingParams
    from imagefolder.runtime.backends.torch_backend import TorchBackend

    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        tokenizer, generator = _models(preset, device)
        candidates = default_candidates(generator.cfg.codebook_size)
        backend = TorchBackend(tokenizer, generator, candidates, device, dtype, batch_max=max(batches))
        for batch in batches:
            row: dict = {"check": f"torch {preset} {dtype_name} batch {batch}", "ok": True}
            try:
                labels = [(7 * i) % generator.cfg.num_classes for i in range(batch)]
                seeds = [SamplingParams(seed=0), SamplingParams(seed=1)]
                session = backend.session(batch)
                session.use_graph = False
                want = [_timed(backend, session, labels, p)[1] for p in seeds]  # also the warm-up
                eager = [_timed(backend, session, labels, seeds[i % 2])[0] for i in range(runs)]
                row["eager_ms_per_image"] = float(np.median(eager)) / batch
                if device == "cuda":
                    session.use_graph = True
                    _timed(backend, session, labels, seeds[0])  # captures, then launches
                    if session.graph is None:
                        raise RuntimeError("the capture failed; see the warning above")
                    graph, same = [], 0
                    for i in range(runs):
                        ms, indices = _timed(backend, session, labels, seeds[i % 2])
                        graph.append(ms)
                        same += int(np.array_equal(indices, want[i % 2]))
                    row["graph_ms_per_image"] = float(np.median(graph)) / batch
                    row["graph_runs_token_identical"] = f"{same}/{runs}"
                    row["ok"] = same == runs
                cost = generation_cost(backend.tokenizer, backend.generator, batch, dtype.itemsize)
                row.update(cost, **floor_ms(cost, batch))
                session.close()
            except Exception as err:  # report and go on with the next configuration
                row.update(ok=False, detail=f"{type(err).__name__}: {err}")
            rows.append(row)
        del backend, tokenizer, generator
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Report


def table(results: list[dict]) -> str:
    lines = [f"{'check':<42}{'ok':<5}{'eager ms/img':>13}{'graph ms/img':>13}{'floor ms/img':>13}  detail"]
    for r in results:

        def cell(key: str, r: dict = r) -> str:
            return f"{r[key]:>13.3f}" if key in r else f"{'':>13}"

        extra = r.get("detail") or r.get("graph_runs_token_identical", "")
        lines.append(
            f"{r['check']:<42}{'yes' if r['ok'] else 'NO':<5}"
            f"{cell('eager_ms_per_image')}{cell('graph_ms_per_image')}{cell('floor_ms')}  {extra}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--preset", default="imagefolder-d17")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT") or "device-check-out")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    started = time.time()
    environment: dict = {"python": sys.version.split()[0], "device": args.device}
    try:
        import torch

        environment["torch"] = torch.__version__
        if args.device == "cuda":
            environment["gpu"] = torch.cuda.get_device_name(0)
    except Exception as err:  # no torch, no GPU: the checks below say so in the report
        environment["torch"] = f"unavailable: {type(err).__name__}: {err}"
    parts = [("torch", lambda: check_torch(args.preset, args.device, batches, dtypes, args.runs))]
    if args.device == "cuda":
        parts.insert(0, ("cuda", check_cuda))
    results: list[dict] = []
    for part, run in parts:  # whatever fails, the report is written and names it
        try:
            results += run()
        except Exception as err:
            results.append({"check": part, "ok": False, "detail": f"{type(err).__name__}: {err}"})
    report = {
        "environment": environment,
        "peak": {"tflops": PEAK_TFLOPS, "tbps": PEAK_TBPS},
        "arguments": vars(args),
        "seconds": round(time.time() - started, 1),
        "results": results,
    }
    path = atomic_write_text(Path(args.out) / "device-check.json", json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"wrote {path} ({report['seconds']} s)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
