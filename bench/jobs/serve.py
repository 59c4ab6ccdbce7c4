"""Job ``serve``: a real Triton server on the ort repository under perf_analyzer, against generation in-process.

For each model (the default model and the run's preset, random weights), the job exports the bundle's
Triton repository (``--backend ort``, one ``KIND_CPU`` instance with every core, sessions for batches
1–8; d17: 1, 2, 4, 8), starts the ``tritonserver`` of the ``nvidia-pytriton`` wheel on loopback ports, and runs
``perf_analyzer`` (gRPC, one-image requests with the official settings) at concurrency 1, 2, 4 and 8:
throughput and p50/p99 latency. Triton's statistics give the batch sizes its dynamic batcher formed (how
many executions of each size); right after each concurrency the same bundle generates in this process
(``OrtBackend`` with the same threads) on the sessions the model ran for those batch sizes, so the server's
overhead is the ratio of its time per image to the in-process time per image of the same work, measured
side by side: overhead = (1 / throughput) ÷ (Σ executions_b · T_b / Σ executions_b · b), where T_b is the
time of the sessions ``session_sizes(b, served)``.

Run only when asked (``--only serve``): it needs the ``serve`` set-up of ``make setup`` (the server wheel
and perf_analyzer, docs/triton.md).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.context import Context
from bench.report import JobResult, ms, ratio, table
from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import MissingDependency
from imagefolder.runtime.triton_server import TritonServer, find_triton

MODEL = "imagefolder_generate"
CONCURRENCY = (1, 2, 4, 8)
REQUEST = {"class_labels": [3], "seed": [0], "cfg": [3.25], "top_k": [750], "top_p": [0.95]}  # one image
# perf_analyzer (tritonclient 2.51's build) links these two; the server wheel carries both under hashed names.
PERF_LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def perf_analyzer(workdir: Path) -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and the environment it runs in (its two libraries linked from the server
    wheel's). ``make setup`` puts it in ``.venv/perf-analyzer``."""
    found = shutil.which("perf_analyzer")
    binary = Path(found) if found else Path(sys.prefix) / "perf-analyzer" / "bin" / "perf_analyzer"
    if not binary.is_file():
        raise MissingDependency(
            "perf_analyzer",
            "serve",
            purpose="for the serve job",
            install=f"pip install --no-deps --target {Path(sys.prefix) / 'perf-analyzer'} 'tritonclient==2.51.0'",
        )
    libraries = workdir / "perf-analyzer-libs"
    libraries.mkdir(parents=True, exist_ok=True)
    wheel = find_triton().libraries
    for name, pattern in PERF_LIBRARIES.items():
        (source,) = sorted(wheel.glob(pattern))
        link = libraries / name
        link.unlink(missing_ok=True)
        link.symlink_to(source)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libraries), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return binary, env


def batch_stats(server: TritonServer) -> dict[int, int]:
    """Executions of the model per batch size so far (Triton's statistics extension)."""
    url = f"http://{server.http_url}/v2/models/{MODEL}/stats"
    with urllib.request.urlopen(url, timeout=30) as response:
        stats = json.loads(response.read())["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for s in stats for b in s.get("batch_stats", [])}


def run_perf_analyzer(
    binary: Path, env: dict, server: TritonServer, concurrency: int, data: Path, out: Path, window: dict
) -> dict:
    """One concurrency level: perf_analyzer's CSV row (throughput, p50 and p99 latency in µs). ``window``:
    ``{"ms": N}`` (time windows) or ``{"requests": N}`` (windows of N requests, for seconds-long generations)."""
    if "requests" in window:
        measure = ["--measurement-mode=count_windows", f"--measurement-request-count={window['requests']}"]
    else:
        measure = [f"--measurement-interval={window['ms']}"]
    command = [
        str(binary),
        "-m",
        MODEL,
        "-u",
        server.grpc_url,
        "-i",
        "grpc",
        f"--concurrency-range={concurrency}:{concurrency}",
        f"--input-data={data}",
        *measure,
        "--max-trials=6",
        "--stability-percentage=25",
        "-f",
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-1500:]
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}) at concurrency {concurrency}: {output}")
    with out.open() as file:
        (row,) = list(csv.DictReader(file))
    return {
        "images_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "command": " ".join(command),
    }


def in_process_seconds(bundle_dir: Path, batches: list[int], min_runs: int, min_s: float) -> dict[int, float]:
    """p50 seconds of one generation of each batch size, in this process (ONNX Runtime, every core): at least
    ``min_runs`` runs and ``min_s`` seconds per batch size, after one warm-up."""
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.loop import ImageRequest, run_batch

    backend = OrtBackend(bundle_dir, threads=len(os.sched_getaffinity(0)))
    out = {}
    for batch in batches:
        session = backend.session(batch)
        images = [ImageRequest(3, SamplingParams(), row) for row in range(batch)]
        run_batch(session, backend.scales, images)  # warm-up
        times: list[float] = []
        while len(times) < min_runs or sum(times) < min_s:
            start = time.perf_counter()
            run_batch(session, backend.scales, images)
            times.append(time.perf_counter() - start)
        out[batch] = sorted(times)[len(times) // 2]
        session.close()
    backend.close()
    return out


def serve_model(
    ctx: Context, name: str, served: list[int], windows: dict[int, dict], in_process: tuple[int, float]
) -> dict:
    """The whole measurement of one model: its repository (sessions for the ``served`` batch sizes), a server,
    perf_analyzer at every concurrency, and in-process generation on the sessions the server ran."""
    from imagefolder.export.triton import export_triton_repository
    from imagefolder.runtime.loop import session_sizes

    bundle_dir = ctx.bundle(name).path
    work = ctx.options.workdir / "serve" / name
    work.mkdir(parents=True, exist_ok=True)
    export_triton_repository(bundle_dir, work / "repo", batches=served, backend="ort")
    data = work / "request.json"
    data.write_text(json.dumps({"data": [REQUEST]}))
    binary, env = perf_analyzer(ctx.options.workdir)
    results = {}
    with TritonServer(work / "repo", work / "server.log") as server:
        for concurrency in CONCURRENCY:
            ctx.say(f"serve: {name}, concurrency {concurrency}")
            before = batch_stats(server)
            measured = run_perf_analyzer(
                binary, env, server, concurrency, data, work / f"perf-c{concurrency}.csv", windows[concurrency]
            )
            after = batch_stats(server)
            formed = {b: n - before.get(b, 0) for b, n in after.items() if n > before.get(b, 0)}
            # An execution of b images runs the sessions the model packs them into (padded where b is not served).
            runs = {b: session_sizes(b, served) for b in formed}
            alone = in_process_seconds(bundle_dir, sorted({s for sizes in runs.values() for s in sizes}), *in_process)
            in_process_s = sum(n * sum(alone[s] for s in runs[b]) for b, n in formed.items())
            in_process_per_image = in_process_s / sum(n * b for b, n in formed.items())
            measured.update(
                batches=formed,
                in_process_s=alone,
                in_process_ms_per_image=1000 * in_process_per_image,
                server_ms_per_image=1000 / measured["images_per_s"],
            )
            measured["overhead"] = measured["server_ms_per_image"] / measured["in_process_ms_per_image"]
            results[str(concurrency)] = measured
    return results


def models(ctx: Context) -> list[str]:
    from bench.bundles import DEFAULT_MODEL

    return list(ctx.options.serve_models or dict.fromkeys([DEFAULT_MODEL, ctx.options.preset]))


def prepare(ctx: Context) -> None:
    find_triton()  # refuse early, in one line, where the server is not installed
    for name in models(ctx):
        ctx.bundle(name)


def run(ctx: Context) -> JobResult:
    raw, rows = {}, []
    for name in models(ctx):
        small = name in ("default", "tiny")
        # d17 takes seconds an image: windows of requests (two batches' worth), sessions of 1, 2, 4 and 8 (the
        # KV caches of all eight sizes would take gigabytes), one in-process run a size after the warm-up
        served = list(range(1, 9)) if small else [1, 2, 4, 8]
        windows = {c: {"ms": 3000} if small else {"requests": 2 * c} for c in CONCURRENCY}
        raw[name] = serve_model(ctx, name, served, windows, (5, 2.0) if small else (1, 0.0))
        for concurrency, m in raw[name].items():
            batches = ", ".join(f"{b}×{n}" for b, n in sorted(m["batches"].items()))
            rows.append(
                [
                    f"{name}, concurrency {concurrency}",
                    f"{m['images_per_s']:.2f}",
                    ms(m["p50_ms"]),
                    ms(m["p99_ms"]),
                    batches,
                    ms(m["server_ms_per_image"]),
                    ms(m["in_process_ms_per_image"]),
                    ratio(m["overhead"]),
                ]
            )
    headers = [
        "ort repository",
        "images/s",
        "p50 ms",
        "p99 ms",
        "batches formed (size×executions)",
        "server ms/image",
        "in-process ms/image",
        "overhead",
    ]
    notes = [
        "perf_analyzer (tritonclient 2.51's build) over gRPC, one-image requests with the official settings, "
        "closed loop at each concurrency; one KIND_CPU instance with every core; dynamic batching, 2 ms delay",
        "in-process: OrtBackend with the same threads, p50 of one generation on each session the model ran for "
        "the batch sizes the server formed, weighted by their executions; overhead = server time per image ÷ that",
    ]
    return JobResult(
        "serve", "Serving on Triton (ort instances) against in-process generation", raw, [table(headers, rows)], notes
    )
