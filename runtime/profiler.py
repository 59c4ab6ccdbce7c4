"""Per-step latency of generation: host wall time of every stage, device time where the backend has it.

A ``StepProfiler`` records runs (one ``generate`` call each). The first ``warmup`` runs pay one-time
costs (session creation, lazy allocation, kernel selection): they are recorded and reported
apart, never mixed into the statistics. An eager run's stages are ``prefill``, ``step[si]``,
``sample[si]``, ``fold[si]`` (si below the last) and ``decode``; a run that replays a CUDA graph has
one stage, ``generation`` (the launch), since a graph has no stages to time apart; a conditioned run
starts with ``encode`` (the reference image through the encoder graph). Host time is
``time.perf_counter_ns`` around the backend call, so for an asynchronous backend it is the enqueue
time; device time comes from the session's ``DeviceTimer`` (CUDA events on the inference stream),
collected once at the end of each run. Runs also record the launches the host enqueued (copies,
memsets, kernels, graph launches) where the session counts them.

``profile_generation`` measures a session that can replay CUDA graphs twice: eager runs first (per
stage: where the time goes), then graph runs (the whole generation: what a served image costs). The
first graph run captures the graph and is its warm-up.

Conventions follow trtllm-bench (TensorRT-LLM's benchmark): percentiles by nearest
rank without interpolation (sorted values, index ⌊n·p⌋); derived numbers per run, then statistics:

- time to first scale = prefill + step[0] + sample[0] (the analogue of TTFT);
- time per step = mean over scales si ≥ 1 of fold[si−1] + step[si] + sample[si] (the analogue of
  TPOT: the fold that makes a scale's input, the step, the sampling; one step emits q_si·2 tokens);
- end to end = wall time of the run, prefill to decoded images; images/s = images ÷ total end to end;
- bytes to and from the device per image: what the session moved between host and device;
- launches per generation: operations the host enqueued for one run (one in graph mode).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagefolder.io import atomic_write_text
from imagefolder.runtime.backends.base import DeviceTimer, GraphSession

PERCENTILES = (50, 90, 99)


class ProfilerError(RuntimeError):
    """The profiler was used out of order or has nothing to report."""


@dataclass
class StageRecord:
    stage: str
    scale: int | None
    start_ns: int
    host_ns: int
    device_ms: float | None = None

    @property
    def label(self) -> str:
        return self.stage if self.scale is None else f"{self.stage}[{self.scale}]"


@dataclass
class RunRecord:
    index: int
    batch: int
    warmup: bool
    start_ns: int
    wall_ns: int = 0
    stages: list[StageRecord] = field(default_factory=list)
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    launches: int | None = None

    def host_ms(self, label: str) -> float:
        return next(s.host_ns for s in self.stages if s.label == label) / 1e6

    def device_ms(self, label: str) -> float | None:
        return next((s.device_ms for s in self.stages if s.label == label), None)


def nearest_rank(values: list[float], pct: int) -> float:
    """The ``pct``-th percentile by nearest rank: ``sorted(values)[min(n·pct // 100, n − 1)]``."""
    if not values:
        raise ProfilerError("no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) * pct // 100, len(ordered) - 1)]


def summarize(values: list[float]) -> dict[str, float]:
    """n, mean, min, max and the ``PERCENTILES`` of ``values`` (milliseconds)."""
    out = {"n": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    out.update({f"p{pct}": nearest_rank(values, pct) for pct in PERCENTILES})
    return out


class StepProfiler:
    """Records the stages of generation runs; ``report`` turns the measured runs into statistics.

    Args:
        warmup: how many first runs are warm-up (recorded, excluded from the statistics).
        clock: a nanosecond clock; ``time.perf_counter_ns`` unless a test scripts the time.
    """

    def __init__(self, warmup: int = 1, clock: Callable[[], int] = time.perf_counter_ns):
        if warmup < 0:
            raise ProfilerError(f"warmup must be ≥ 0, got {warmup}")
        self.warmup = warmup
        self.runs: list[RunRecord] = []
        self._clock = clock
        self._current: RunRecord | None = None
        self._timer: DeviceTimer | None = None

    @contextlib.contextmanager
    def run(self, batch: int, device_timer: DeviceTimer | None = None) -> Iterator[RunRecord]:
        """One generation of ``batch`` images; every run of a profiler has the same batch."""
        if self._current is not None:
            raise ProfilerError("runs do not nest")
        if self.runs and self.runs[0].batch != batch:
            raise ProfilerError(f"this profiler measures batch {self.runs[0].batch}; use another one for {batch}")
        record = RunRecord(len(self.runs), batch, len(self.runs) < self.warmup, self._clock())
        self._current, self._timer = record, device_timer
        try:
            yield record
            record.wall_ns = self._clock() - record.start_ns
        finally:
            self._current, self._timer = None, None
        if device_timer is not None:
            device = dict(device_timer.collect())
            for stage in record.stages:
                stage.device_ms = device.get(stage.label)
        self.runs.append(record)

    @contextlib.contextmanager
    def stage(self, name: str, scale: int | None = None) -> Iterator[None]:
        """Time one backend call of the current run."""
        if self._current is None:
            raise ProfilerError(f"stage {name} outside a run")
        record = StageRecord(name, scale, self._clock(), 0)
        timer = self._timer
        if timer is not None:
            timer.start(record.label)
        yield
        if timer is not None:
            timer.stop(record.label)
        record.host_ns = self._clock() - record.start_ns
        self._current.stages.append(record)

    # -- report --------------------------------------------------------------------------------------

    def report(self) -> dict:
        """Statistics over the measured runs (milliseconds), as a JSON-ready dict."""
        measured = [r for r in self.runs if not r.warmup]
        if not measured:
            raise ProfilerError(f"no measured run ({len(self.runs)} recorded, {self.warmup} warm-up)")
        labels = [s.label for s in measured[0].stages]
        stages = []
        for label in labels:
            first = next(s for s in measured[0].stages if s.label == label)
            stages.append(
                {
                    "label": label,
                    "stage": first.stage,
                    "scale": first.scale,
                    "host_ms": summarize([r.host_ms(label) for r in measured]),
                    "device_ms": _device_stats([r.device_ms(label) for r in measured]),
                }
            )
        step_scales = sorted({s.scale for s in measured[0].stages if s.stage == "step" and s.scale is not None})
        eager = "prefill" in labels

        def first_scale(get: Callable[[str], float]) -> float:
            return get("prefill") + get("step[0]") + get("sample[0]")

        def per_step(get: Callable[[str], float]) -> float:
            later = [si for si in step_scales if si > 0]
            return sum(get(f"fold[{si - 1}]") + get(f"step[{si}]") + get(f"sample[{si}]") for si in later) / len(later)

        batch = measured[0].batch
        e2e = [r.wall_ns / 1e6 for r in measured]
        launches = [r.launches for r in measured if r.launches is not None]
        return {
            "batch": batch,
            "mode": "eager" if eager else "graph",
            "runs": len(measured),
            "warmup_runs": len(self.runs) - len(measured),
            "warmup_e2e_ms": [r.wall_ns / 1e6 for r in self.runs if r.warmup],
            "stages": stages,
            "time_to_first_scale_ms": _derived(measured, first_scale) if eager else None,
            "time_per_step_ms": _derived(measured, per_step) if eager and len(step_scales) > 1 else None,
            "e2e_ms": summarize(e2e),
            "images_per_s": batch * len(measured) / (sum(e2e) / 1e3),
            "bytes_to_device_per_image": max(r.bytes_to_device for r in measured) / batch,
            "bytes_from_device_per_image": max(r.bytes_from_device for r in measured) / batch,
            "launches_per_generation": max(launches) if len(launches) == len(measured) else None,
        }

    def chrome_trace(self) -> dict:
        """All runs (warm-up included) in Chrome trace event format; open in Perfetto or chrome://tracing."""
        origin = self.runs[0].start_ns if self.runs else 0
        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "imagefolder"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "host"}},
        ]
        for run in self.runs:
            events.append(
                {
                    "name": f"run[{run.index}]",
                    "cat": "warmup" if run.warmup else "run",
                    "ph": "X",
                    "ts": (run.start_ns - origin) / 1e3,
                    "dur": run.wall_ns / 1e3,
                    "pid": 1,
                    "tid": 1,
                    "args": {"batch": run.batch},
                }
            )
            for s in run.stages:
                args: dict = {"run": run.index}
                if s.device_ms is not None:
                    args["device_ms"] = s.device_ms
                events.append(
                    {
                        "name": s.label,
                        "cat": s.stage,
                        "ph": "X",
                        "ts": (s.start_ns - origin) / 1e3,
                        "dur": s.host_ns / 1e3,
                        "pid": 1,
                        "tid": 1,
                        "args": args,
                    }
                )
        return {"traceEvents": events, "displayTimeUnit": "ms"}


def _device_stats(values: list[float | None]) -> dict | None:
    present = [v for v in values if v is not None]
    return summarize(present) if values and len(present) == len(values) else None


def _derived(runs: list[RunRecord], combine: Callable[[Callable[[str], float]], float]) -> dict:
    """Host (and device, where every stage has it) statistics of a per-run combination of stages."""
    host = [combine(run.host_ms) for run in runs]
    try:
        device = [combine(_require(run.device_ms)) for run in runs]
    except LookupError:
        device = None
    return {"host": summarize(host), "device": summarize(device) if device else None}


def _require(get: Callable[[str], float | None]) -> Callable[[str], float]:
    def value(label: str) -> float:
        found = get(label)
        if found is None:
            raise LookupError(label)
        return found

    return value


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def format_table(report: dict) -> str:
    """The report as a fixed-width text table (milliseconds)."""
    head = f"{'stage':<20}{'clock':<8}" + "".join(f"{c:>10}" for c in ("p50", "p90", "p99", "min", "max", "mean"))
    what = "eager, per stage" if report["mode"] == "eager" else "CUDA graph, whole generation"
    lines = [
        f"batch {report['batch']} ({what}): {report['runs']} runs after {report['warmup_runs']} warm-up (times in ms)",
        head,
        "-" * len(head),
    ]

    def row(name: str, clock: str, stats: dict | None) -> None:
        if stats is not None:
            cells = "".join(f"{stats[c]:>10.3f}" for c in ("p50", "p90", "p99", "min", "max", "mean"))
            lines.append(f"{name:<20}{clock:<8}{cells}")

    for stage in report["stages"]:
        row(stage["label"], "host", stage["host_ms"])
        row(stage["label"], "device", stage["device_ms"])
    lines.append("-" * len(head))
    for name, key in (("time to first scale", "time_to_first_scale_ms"), ("time per step", "time_per_step_ms")):
        if report[key] is not None:
            row(name, "host", report[key]["host"])
            row(name, "device", report[key]["device"])
    row("end to end", "host", report["e2e_ms"])
    lines.append(
        f"images/s: {report['images_per_s']:.3f}; per image: host → device "
        f"{report['bytes_to_device_per_image']:,.0f} B, device → host {report['bytes_from_device_per_image']:,.0f} B"
    )
    if report["launches_per_generation"] is not None:
        lines.append(f"launches per generation (batch {report['batch']}): {report['launches_per_generation']}")
    return "\n".join(lines)


# -- profiling a backend -----------------------------------------------------------------------------


@dataclass
class ProfileResult:
    """Reports and traces of ``profile_generation``, one per (batch size, mode)."""

    reports: list[dict]
    traces: list[dict]

    def table(self) -> str:
        return "\n\n".join(format_table(report) for report in self.reports)

    def write_json(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps({"reports": self.reports}, indent=2))

    def write_trace(self, path: str | Path) -> Path:
        """One Chrome trace with a process per report (batch size and mode)."""
        events = []
        for pid, trace in enumerate(self.traces, start=1):
            events += [{**e, "pid": pid} for e in trace["traceEvents"] if e["name"] != "process_name"]
            events.append(
                {
                    "name": "process_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": 0,
                    "args": {"name": f"batch {self.reports[pid - 1]['batch']} {self.reports[pid - 1]['mode']}"},
                }
            )
        return atomic_write_text(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def profile_generation(
    backend,
    batches: Sequence[int],
    params,
    runs: int = 10,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
    reference_image=None,
    force=None,
) -> ProfileResult:
    """Time ``warmup + runs`` generations per batch size on one reused session each.

    A session that replays CUDA graphs (``GraphSession`` with ``use_graph``) is measured twice:
    eager first (``warmup`` + ``runs``, per stage), then with its graph (one capture run as warm-up,
    then ``runs`` replays, the whole generation). Other sessions give the eager report only.

    Args:
        backend: any backend of ``runtime.backends``.
        batches: batch sizes to measure.
        params: ``loop.SamplingParams`` (the seed is the same for every run).
        runs: measured runs per batch size and mode (≥ 1).
        warmup: eager runs before them, excluded from the statistics.
        progress: called with a line of text before each batch size and mode.
        reference_image: conditioned generation: a reference (1, 3, H, H) in [-1, 1] that every image of a
            run encodes (the ``encode`` stage, before the generation) and is conditioned on with ``force``
            (P, 2) (``core.conditioning.force_mask``).
    """
    from imagefolder.runtime.loop import generate  # the loop imports this module

    if runs < 1:
        raise ProfilerError(f"runs must be ≥ 1, got {runs}")
    reports, traces = [], []
    for batch in batches:
        labels = [i % backend.num_classes for i in range(batch)]
        with contextlib.closing(backend.session(batch)) as session:
            graphs = isinstance(session, GraphSession) and session.use_graph
            for mode, first in (("eager", warmup), ("graph", 1))[: 1 + graphs]:
                if isinstance(session, GraphSession):
                    session.use_graph = mode == "graph"
                if progress is not None:
                    progress(f"batch {batch}, {mode}: {first} warm-up + {runs} runs")
                profiler = StepProfiler(warmup=first)
                for _ in range(first + runs):
                    generate(
                        backend,
                        labels,
                        params,
                        profiler=profiler,
                        session=session,
                        force=force,
                        reference_images=None if reference_image is None else reference_image.repeat(batch, axis=0),
                    )
                reports.append(profiler.report())
                traces.append(profiler.chrome_trace())
    return ProfileResult(reports, traces)


def layer_table(layer_times: dict[str, dict[str, list[float]]], top: int = 15) -> str:
    """The ``top`` layers by total time over all runs, from ``TrtBackend.layer_times()``."""
    rows = [(sum(ms), len(ms), graph, layer) for graph, layers in layer_times.items() for layer, ms in layers.items()]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1.0
    lines = [f"{'graph':<11} {'layer':<60} {'calls':>6} {'mean ms':>9} {'share':>6}"]
    for ms, calls, graph, layer in rows[:top]:
        lines.append(f"{graph:<11} {layer[:60]:<60} {calls:>6} {ms / calls:>9.3f} {ms / total:>6.1%}")
    return "\n".join(lines)
