"""The benchmark suite (``python -m bench``): its calibration, its floors and the multiples it reports,
the files a run writes, and a smoke run of the runner on the tiny preset. No time is asserted: the
numbers of a shared machine are whatever they are; what is checked is that they are positive and that
every multiple in the tables is the time and floor it was computed from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import calibrate, cost, report
from bench.jobs.folding import squares_summing_to, unfolded_config
from imagefolder.configs import from_name, tiny
from imagefolder.runtime.plots import read_floor, stage_labels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One quick run of the runner: calibration, roofline and overhead on the tiny preset, one run each."""
    root = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "bench", "--preset", "tiny", "--only", "calibrate,roofline,overhead"]
    command += ["--runs", "1", "--warmup", "0", "--budget", "20", "--threads", "1"]
    command += ["--workdir", str(root / "work"), "--out", str(root / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out", result


def test_calibration_measures_positive_rates():
    shapes = [(1, 4, 8, 16), (3, 5, 7, 9)]
    rates = calibrate.gemm_gflops(shapes, threads=1, min_s=0.0)
    assert set(rates) == set(shapes) and all(rate > 0 for rate in rates.values())
    assert calibrate.memory_read_gbs(1, nbytes=8 * 2**20) > 0
    assert all(r > 0 for r in calibrate.contention(shapes[:1], threads=2, min_s=0.0).values())


def test_a_floor_is_the_larger_of_its_two_bounds():
    stage = cost.step_cost(tiny(), batch=1, q=4)
    slow_gemm = {shape: 1.0 for shape in cost.distinct_gemms([stage])}  # 1 GFLOP/s
    compute = calibrate.stage_floor(stage, slow_gemm, memory_gbs=1e6)
    assert compute.bound == "compute" and compute.ms == compute.compute_ms == pytest.approx(stage.flops / 1e6)
    assert compute.gemm_gflops == pytest.approx(1.0)
    memory = calibrate.stage_floor(stage, {s: 1e9 for s in slow_gemm}, memory_gbs=1.0)
    assert memory.bound == "memory" and memory.ms == memory.memory_ms == pytest.approx(stage.bytes_read / 1e6)


def test_the_unfolded_generator_has_twice_the_positions_and_one_branch():
    for preset in ("tiny", "imagefolder-d17"):
        config = from_name(preset)
        unfolded = unfolded_config(config).generator
        assert unfolded.positions == 2 * config.generator.positions and unfolded.num_branches == 1
        assert (unfolded.width, unfolded.depth, unfolded.codebook_size) == (
            config.generator.width,
            config.generator.depth,
            config.generator.codebook_size,
        )
    assert sum(side * side for side in squares_summing_to(572)) == 572


def test_the_generated_section_replaces_only_itself(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nIntro.\n\n## History (issue 3)\n\nby hand\n")
    report.replace_section(page, "first")
    report.replace_section(page, "second")
    text = page.read_text()
    assert text.count(report.BEGIN) == 1 and "second" in text and "first" not in text
    assert text.index("Intro.") < text.index(report.BEGIN) < text.index("## History (issue 3)")
    assert text.endswith("by hand\n")


def test_smoke_run_writes_results_figures_and_a_floor_file(smoke):
    out, result = smoke
    assert {"bench.json", "floor.json", "roofline.png", "benchmarks.md"} <= {p.name for p in out.iterdir()}
    assert "### Roofline" in result.stdout and "s / 20 s]" in result.stderr  # tables on stdout, progress on stderr
    data = json.loads((out / "bench.json").read_text())
    assert data["machine"]["cpu"] and "-m bench --preset tiny --only calibrate" in data["machine"]["command"]
    assert set(data["jobs"]) == {"calibrate", "roofline", "overhead"}
    floors = read_floor(out / "floor.json", [1, 2, 4, 8], len(tiny().generator.scales), "tiny", "fp32")
    assert all(ms > 0 for batch in floors.values() for ms in batch.values())
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_run_multiples_are_the_times_over_the_floors(smoke):
    out, _ = smoke
    data = json.loads((out / "bench.json").read_text())
    calib = data["jobs"]["calibrate"]
    assert calib["memory_gbs"] > 0 and all(rate > 0 for *_, rate in calib["gemm_gflops"])
    page = (out / "benchmarks.md").read_text()
    for batch, entry in data["jobs"]["roofline"].items():
        assert list(entry["stages"]) == stage_labels(len(tiny().generator.scales))
        for label, stage in entry["stages"].items():
            floor = stage["floor"]
            assert floor["ms"] == max(floor["compute_ms"], floor["memory_ms"]) > 0
            assert floor["bound"] == ("compute" if floor["compute_ms"] >= floor["memory_ms"] else "memory")
            cells = [report.ms(floor["ms"])]
            cells += [
                c
                for name in ("torch", "ort")
                for c in (report.ms(stage[name]["p50"]), report.ratio(stage[name]["p50"] / floor["ms"]))
            ]
            assert f"| {label} | " in page and " | ".join(cells) + " |" in page, (batch, label)
        assert entry["floor_ms"] == pytest.approx(sum(s["floor"]["ms"] for s in entry["stages"].values()))


def test_smoke_run_overhead_adds_up(smoke):
    out, _ = smoke
    for entry in json.loads((out / "bench.json").read_text())["jobs"]["overhead"].values():
        parts = entry["graphs_ms"] + entry["session_ms"] + entry["loop_ms"]
        assert entry["e2e_ms"] == pytest.approx(parts)  # one run: the p50s are that run's values
        assert entry["overhead_ms"] == pytest.approx(entry["e2e_ms"] - entry["graphs_ms"])


def test_unknown_jobs_are_refused():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "roofline,nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown job(s) ['nope']" in result.stderr


def test_the_package_never_imports_the_bench():
    sources = [p for part in ("imagefolder", "export", "runtime", "cli") for p in (ROOT / part).rglob("*.py")]
    assert not [p for p in sources if "from bench" in p.read_text() or "import bench" in p.read_text()]


def test_quantized_bundles_are_picked_up_once_the_export_writes_them(monkeypatch):
    from bench import bundles

    assert bundles.weight_format({"weights": {"stored_bytes": 1}}) == "fp"  # manifests before branch quantize
    assert bundles.weight_format({"weights": "int4"}) == "int4"

    def export_before(out_dir, tokenizer, generator, config, dtype="fp32"): ...

    def export_after(out_dir, tokenizer, generator, config, dtype="fp32", weights="fp"): ...

    monkeypatch.setattr(bundles, "export_bundle", export_before)
    assert bundles.weight_formats() == ()
    monkeypatch.setattr(bundles, "export_bundle", export_after)
    assert bundles.weight_formats() == ("int8", "int4")


def test_the_compare_job_times_every_stage_and_tells_apart_other_tokens(tmp_path):
    from bench.jobs.compare import compare, table
    from imagefolder.export.onnx_export import export_bundle
    from tests.models import randomized

    same = [export_bundle(tmp_path / name, *randomized(tiny()), tiny(), progress=False) for name in ("a", "b")]
    other = export_bundle(tmp_path / "other", *randomized(tiny(), seed=1), tiny(), progress=False)
    result = compare([*same, other], runs=1, warmup=0)
    scales = len(tiny().generator.scales)
    assert {f"step[{si}]" for si in range(scales)} | {"prefill", "decode", "end to end"} <= set(result["stages"])
    assert all(len(times) == 3 and min(times) > 0 for times in result["stages"].values())
    assert result["greedy"] == [True, True, False] and result["seeded"][:2] == [True, True]
    rows = table(result).splitlines()
    assert rows[0].count("|") == 7 and any(row.startswith("| end to end |") for row in rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "compare", "--bundles", "NOT_A_BUNDLE,NOT_A_BUNDLE"], "Error: NOT_A_BUNDLE: no manifest.json"),
        (["--only", "compare", "--bundles", "a"], "--only compare and --bundles A,B"),
        (["--only", "compare"], "--only compare and --bundles A,B"),
        (["--only", "roofline", "--bundles", "a,b"], "--only compare and --bundles A,B"),
        (["--only", "pruning", "--pruning-images", "5"], "--pruning-images ≥ 10"),
        (["--only", "pruning", "--pruning-ratios", "0.5,1.5"], "--pruning-ratios"),
    ],
)
def test_the_runner_refuses_bad_input_in_one_line(tmp_path, argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--preset", "tiny", "--workdir", str(tmp_path / "work"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # nothing exported


def test_the_pruning_job_prunes_the_last_two_scales_and_recommends_within_the_bounds():
    from bench.jobs.pruning import recommend, variants

    options = variants((1, 2, 3, 4, 6), (0.75, 0.5), 0.75)
    assert "int8 compute + prune 0.5" not in variants((1, 2, 3, 4, 6), (0.5,), None)
    assert options["prune 0.5"] == {"prune": {3: 0.5, 4: 0.5}} and options["dense"] == {}
    assert options["int8 compute + prune 0.75"] == {"weights": "int8", "compute": "int8", "prune": {3: 0.75, 4: 0.75}}
    speed = {"dense": 1.0, "prune 0.75": 1.2, "prune 0.5": 1.5, "int8 compute": 1.7, "int8 compute + prune 0.5": 2.2}
    quality = {  # (accuracy, Fréchet distance): prune 0.5 and the combination lose 3 points
        "dense": (0.95, 2.0),
        "prune 0.75": (0.945, 2.1),
        "prune 0.5": (0.92, 2.1),
        "int8 compute": (0.95, 2.15),
        "int8 compute + prune 0.5": (0.92, 2.3),
    }
    best, verdict = recommend(
        {k: {"speed_up": v} for k, v in speed.items()},
        {k: {"class_accuracy": a, "frechet_distance": f} for k, (a, f) in quality.items()},
    )
    assert best == "int8 compute"
    assert "prune 0.75 gives 1.20× within the bounds; the ≥ 1.4× target is not met" in verdict
    assert "int8 compute + prune 0.5: 2.20× (target ≥ 1.6×), outside the quality bounds" in verdict


def test_the_contention_line_keeps_the_digits_that_matter_or_says_why_there_is_none():
    from bench.jobs.calibrate import contention_note

    shape = (1, 2, 128, 512)
    assert contention_note(2, {shape: 0.0031}) == "2 threads against 1 (GEMM rate on 2 threads ÷ on one): " + (
        "0.0031× at (2×128)·(128×512)"
    )
    assert "not measured" in contention_note(1, {})
    for broken in (0.0, float("inf"), float("nan")):
        assert contention_note(2, {shape: broken}).startswith("contention could not be measured")


def test_the_serve_job_finds_perf_analyzer_and_its_libraries(tmp_path):
    """`make setup` installs tritonclient 2.51's perf_analyzer (the last build for glibc 2.35); it runs with
    the two libraries it links taken from the server wheel."""
    from bench.jobs.serve import perf_analyzer
    from tests.triton_real import require_server

    require_server()
    binary, env = perf_analyzer(tmp_path)
    result = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Perf Analyzer Version 2.51" in result.stderr, result.stdout + result.stderr


def test_the_serve_figure_draws_both_curves_of_each_model():
    from bench import figures

    def level(rate, in_process_ms):
        return {"images_per_s": rate, "in_process_ms_per_image": in_process_ms, "overhead": 1000 / rate / in_process_ms}

    raw = {m: {str(c): level(10.0 * c, 90.0 / c) for c in (1, 2, 4, 8)} for m in ("default", "imagefolder-d17")}
    figure = figures.serve_throughput(raw, "test")
    (ax,) = figure.axes
    assert len(ax.lines) == 4 and [round(y, 3) for y in ax.lines[1].get_ydata()] == [11.111, 22.222, 44.444, 88.889]
    assert [t.get_text() for t in ax.texts][:4] == ["1.11×", "1.11×", "1.11×", "1.11×"]  # server ÷ in-process
