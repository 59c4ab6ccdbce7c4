"""Step profiler: exact statistics on scripted timings, warm-up handling, device times, and the outputs
(text table, JSON, Chrome trace)."""

from __future__ import annotations

import json

import pytest

from imagefolder.runtime.profiler import (
    ProfilerError,
    StepProfiler,
    format_table,
    nearest_rank,
    summarize,
    to_json,
)

MS = 1_000_000


class ScriptedClock:
    """A nanosecond clock that advances only when told."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += int(ms * MS)


class FakeTimer:
    """A DeviceTimer that reports half of each stage's label length in ms (deterministic)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, float]] = []
        self.open: set[str] = set()

    def start(self, label: str) -> None:
        self.open.add(label)

    def stop(self, label: str) -> None:
        self.open.remove(label)
        self.pairs.append((label, len(label) / 2))

    def collect(self) -> list[tuple[str, float]]:
        out, self.pairs = self.pairs, []
        return out


def _fake_generation(prof: StepProfiler, clock: ScriptedClock, scale_ms: float, timer=None, scales: int = 3) -> None:
    """prefill 2 ms; per scale: step 1.5 (scale 0) or `scale_ms`, sample 1, fold 0.5 (but the last);
    decode 4 ms; 0.25 ms before each scale. The run moves 100 bytes to the device and 300 back."""
    with prof.run(batch=2, device_timer=timer) as run:
        with prof.stage("prefill"):
            clock.advance(2)
        for si in range(scales):
            clock.advance(0.25)
            with prof.stage("step", si):
                clock.advance(scale_ms if si else 1.5)
            with prof.stage("sample", si):
                clock.advance(1)
            if si < scales - 1:
                with prof.stage("fold", si):
                    clock.advance(0.5)
        with prof.stage("decode"):
            clock.advance(4)
        run.bytes_to_device, run.bytes_from_device = 100, 300


def test_nearest_rank_percentiles():
    values = list(range(1, 101))
    assert [nearest_rank(values, p) for p in (50, 90, 99)] == [51, 91, 100]  # index ⌊n·p⌋
    ten = [7, 1, 9, 3, 5, 2, 8, 10, 4, 6]
    assert [nearest_rank(ten, p) for p in (50, 90, 99)] == [6, 10, 10]
    assert nearest_rank([42.0], 99) == 42.0
    stats = summarize([4.0, 1.0, 3.0, 2.0])
    assert stats == {"n": 4, "mean": 2.5, "min": 1.0, "max": 4.0, "p50": 3.0, "p90": 4.0, "p99": 4.0}
    with pytest.raises(ProfilerError):
        nearest_rank([], 50)


def test_report_on_scripted_runs():
    clock = ScriptedClock()
    prof = StepProfiler(warmup=1, clock=clock)
    _fake_generation(prof, clock, scale_ms=100)  # warm-up: slow, excluded
    for step_ms in (3, 5, 4, 6):
        _fake_generation(prof, clock, scale_ms=step_ms)
    report = prof.report()
    assert (report["batch"], report["runs"], report["warmup_runs"]) == (2, 4, 1)
    e2e_warm = 2 + 3 * 0.25 + 1.5 + 2 * 100 + 3 * 1 + 2 * 0.5 + 4
    assert report["warmup_e2e_ms"] == [pytest.approx(e2e_warm)]

    labels = [s["label"] for s in report["stages"]]
    assert labels == [
        "prefill",
        "step[0]",
        "sample[0]",
        "fold[0]",
        "step[1]",
        "sample[1]",
        "fold[1]",
        "step[2]",
        "sample[2]",
        "decode",
    ]
    step1 = report["stages"][4]["host_ms"]
    assert step1 == {"n": 4, "mean": 4.5, "min": 3.0, "max": 6.0, "p50": 5.0, "p90": 6.0, "p99": 6.0}
    assert report["stages"][4]["device_ms"] is None

    ttfs = report["time_to_first_scale_ms"]["host"]["p50"]
    assert ttfs == pytest.approx(4.5)  # prefill 2 + step[0] 1.5 + sample[0] 1
    assert report["time_to_first_scale_ms"]["device"] is None
    tps = report["time_per_step_ms"]["host"]  # fold[si-1] 0.5 + step + sample 1 per run
    assert (tps["min"], tps["p50"], tps["max"]) == (pytest.approx(4.5), pytest.approx(6.5), pytest.approx(7.5))
    e2e = [2 + 0.75 + 1.5 + 2 * s + 3 + 1 + 4 for s in (3, 5, 4, 6)]
    assert report["e2e_ms"]["mean"] == pytest.approx(sum(e2e) / 4)
    assert report["images_per_s"] == pytest.approx(2 * 4 / (sum(e2e) / 1e3))
    assert (report["bytes_to_device_per_image"], report["bytes_from_device_per_image"]) == (50, 150)

    table = format_table(report)
    assert "step[2]" in table and "time per step" in table and "images/s" in table
    assert len({len(line) for line in table.splitlines()[1:-1]}) == 1  # fixed width between title and footer
    assert json.loads(to_json(report)) == json.loads(json.dumps(report))


def test_device_times_are_collected_per_stage():
    clock = ScriptedClock()
    timer = FakeTimer()
    prof = StepProfiler(warmup=0, clock=clock)
    for _ in range(2):
        _fake_generation(prof, clock, scale_ms=3, timer=timer)
    assert not timer.open
    report = prof.report()
    stages = {s["label"]: s for s in report["stages"]}
    assert stages["step[1]"]["device_ms"]["p50"] == len("step[1]") / 2
    assert stages["prefill"]["device_ms"]["mean"] == len("prefill") / 2
    ttfs = report["time_to_first_scale_ms"]["device"]
    assert ttfs["p50"] == (len("prefill") + len("step[0]") + len("sample[0]")) / 2
    assert "device" in format_table(report)


def test_chrome_trace_round_trips():
    clock = ScriptedClock()
    timer = FakeTimer()
    prof = StepProfiler(warmup=1, clock=clock)
    for _ in range(2):
        _fake_generation(prof, clock, scale_ms=3, timer=timer)
    trace = json.loads(json.dumps(prof.chrome_trace()))
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 2 * (1 + 1 + 3 * 2 + 2 + 1)  # per run: run, prefill, step+sample ×3, fold ×2, decode
    for event in events:
        required = {"name", "ph", "pid", "tid"} | ({"ts", "dur"} if event["ph"] == "X" else {"args"})
        assert required <= event.keys(), event
    assert {e["cat"] for e in complete if e["name"].startswith("run[")} == {"warmup", "run"}
    step = next(e for e in complete if e["name"] == "step[2]")
    assert step["dur"] == pytest.approx(3000.0) and step["args"]["device_ms"] == len("step[2]") / 2
    assert min(e["ts"] for e in complete) == 0


def test_misuse_raises():
    prof = StepProfiler(warmup=1)
    with pytest.raises(ProfilerError, match="outside a run"), prof.stage("prefill"):
        pass
    with prof.run(batch=1):
        pass
    with pytest.raises(ProfilerError, match="no measured run"):
        prof.report()
    with pytest.raises(ProfilerError, match="batch 1"), prof.run(batch=2):
        pass
    with pytest.raises(ProfilerError, match="warmup"):
        StepProfiler(warmup=-1)


def test_layer_table_orders_layers_by_total_time():
    from imagefolder.runtime.profiler import layer_table

    table = layer_table({"ar_step": {"attn": [1.0, 3.0], "ffn": [0.5]}, "fold": {"matmul": [0.2] * 2}})
    lines = table.splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["attn", "ffn", "matmul"]
    assert "2.000" in lines[1] and "81.6%" in lines[1]  # mean 2 ms, 4 of 4.9 ms


def test_graph_runs_report_the_whole_generation_and_its_launches():
    clock, timer = ScriptedClock(), FakeTimer()
    prof = StepProfiler(warmup=1, clock=clock)
    for launches, ms in ((900, 30.0), (1, 2.0), (1, 3.0)):  # the capture run is the warm-up
        with prof.run(batch=4, device_timer=timer) as run:
            with prof.stage("generation"):
                clock.advance(ms)
            run.launches = launches
    report = prof.report()
    assert report["mode"] == "graph" and [s["label"] for s in report["stages"]] == ["generation"]
    assert report["stages"][0]["device_ms"]["mean"] == len("generation") / 2
    assert report["time_to_first_scale_ms"] is None and report["time_per_step_ms"] is None
    assert report["launches_per_generation"] == 1 and report["images_per_s"] == pytest.approx(8 / 5e-3)
    table = format_table(report)
    assert "CUDA graph, whole generation" in table and "launches per generation (batch 4): 1" in table


def test_runs_without_a_launch_count_report_none():
    clock = ScriptedClock()
    prof = StepProfiler(warmup=0, clock=clock)
    _fake_generation(prof, clock, scale_ms=3)
    report = prof.report()
    assert report["mode"] == "eager" and report["launches_per_generation"] is None
    assert "launches" not in format_table(report)
