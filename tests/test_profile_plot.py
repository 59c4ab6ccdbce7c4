"""``imagefolder profile --plot``: a PNG of the expected size from a real profile of the default model,
with the floor from the bench's floor file, and one-line refusals (no matplotlib, a floor that does
not fit, --floor without --plot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from imagefolder.cli.export import main as export_main
from imagefolder.cli.main import main
from imagefolder.errors import InputError
from imagefolder.install import install_command
from imagefolder.runtime import plots

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _invoke(args: list) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The default model (the shipped tiny model) exported as an fp32 bundle."""
    out = tmp_path_factory.mktemp("plot") / "bundle"
    result = CliRunner().invoke(export_main, ["onnx", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def floor_file(tmp_path_factory) -> Path:
    """The floor file of the tiny preset, written by the bench's calibration."""
    root = tmp_path_factory.mktemp("floor")
    command = [sys.executable, "-m", "bench", "--preset", "tiny", "--only", "calibrate", "--budget", "10"]
    command += ["--threads", "1", "--workdir", str(root), "--out", str(root)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "floor.json"


def _profile(bundle: Path, *extra) -> list:
    return ["profile", "--bundle", bundle, "--backend", "ort", "--runs", 2, "--warmup", 1, *extra]


def test_plot_with_the_floor_is_a_png_of_the_expected_size(bundle, floor_file, tmp_path):
    out = tmp_path / "profile.png"
    code, output = _invoke(_profile(bundle, "--batch", "1,2", "--plot", out, "--floor", floor_file))
    assert code == 0, output
    assert f"wrote {out}" in output and out.read_bytes()[:8] == PNG
    with Image.open(out) as image:
        assert image.size == plots.profile_size(2) == (1200, 900)


def test_plot_without_a_floor(bundle, tmp_path):
    out = tmp_path / "one.png"
    code, output = _invoke(_profile(bundle, "--plot", out))
    assert code == 0, output
    with Image.open(out) as image:
        assert image.size == plots.profile_size(1)


def test_a_floor_of_other_batches_is_refused_before_profiling(bundle, floor_file, tmp_path):
    code, output = _invoke(_profile(bundle, "--batch", "3", "--plot", tmp_path / "x.png", "--floor", floor_file))
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and "not of [3]" in errors[0], output
    assert "warm-up" not in output and not (tmp_path / "x.png").exists()


def test_floor_needs_plot(bundle, floor_file):
    code, output = _invoke(_profile(bundle, "--floor", floor_file))
    assert code == 2 and "--floor draws on the --plot figure" in output


def test_plot_without_matplotlib_names_the_extra(bundle, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    code, output = _invoke(_profile(bundle, "--plot", tmp_path / "x.png"))
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1, output
    assert "matplotlib is not installed" in errors[0] and install_command("bench") in errors[0]
    assert "warm-up" not in output and not (tmp_path / "x.png").exists()


def test_a_floor_file_of_another_model_is_refused(tmp_path):
    floor = tmp_path / "floor.json"
    floor.write_text('{"kind": "imagefolder-floor", "version": 1, "model": "imagefolder-d17", "dtype": "fp32"}')
    with pytest.raises(InputError, match="floor of model imagefolder-d17, this profile's is tiny"):
        plots.read_floor(floor, [1], 5, "tiny", "fp32")
    floor.write_text("{}")
    with pytest.raises(InputError, match="is not a floor file"):
        plots.read_floor(floor, [1], 5)


def _stats(ms: float) -> dict:
    return {"n": 2, "mean": ms, "min": ms, "max": 1.2 * ms, "p50": ms, "p90": 1.2 * ms, "p99": 1.2 * ms}


def test_a_cuda_graph_report_is_one_bar_of_device_time_against_the_whole_floor(tmp_path):
    """TensorRT's two reports per batch: eager stages in device time, and the graph's one stage."""
    labels = plots.stage_labels(2)
    stages = [
        {"label": label, "host_ms": _stats(0.01), "device_ms": _stats(1.0), "stage": label.split("[")[0]}
        for label in labels
    ]
    eager = {"batch": 1, "mode": "eager", "runs": 2, "stages": stages, "e2e_ms": _stats(9.0), "images_per_s": 110}
    graph = dict(
        eager, mode="graph", stages=[{"label": "generation", "host_ms": _stats(0.05), "device_ms": _stats(3.5)}]
    )
    floors = {1: {label: 0.1 for label in labels}}  # 7 stages: 0.7 ms for the whole generation
    figure = plots.profile_figure([eager, graph], (1, 2), floors, "trt")
    eager_axes, graph_axes = figure.axes
    assert eager_axes.get_ylabel().startswith("device time") and "CUDA graph" in graph_axes.get_title()
    assert [t.get_text() for t in graph_axes.texts] == ["5.0×"]  # 3.5 ms against 0.7 ms
    assert [t.get_text() for t in eager_axes.texts][0] == "10.0×"  # the prefill: 1 ms against 0.1 ms
    with Image.open(plots.save_png(figure, tmp_path / "trt.png")) as image:
        assert image.size == plots.profile_size(2)
