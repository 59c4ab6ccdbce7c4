"""``scripts/gpu_first_run.sh`` runs end to end on the fakes, so the script a person first runs on a GPU works.

Every command of the script is a new process; a ``sitecustomize`` module put on their path installs the
TensorRT and cuda-python fakes (tests/fakes) in each, on the same fake GPU, so engines built by one step
load in the next. A stand-in ``nvidia-smi`` reports the driver, and a stand-in ``pip`` records what the
install step asks for. The full run takes the paths that otherwise only a GPU machine takes: no BUNDLE (the
default model is exported with torch), INSTALL=1, and the GPU tests (tests/test_trt_gpu.py, on the fakes),
after the summary. The refusals at step 1 (a driver or GPU too old for the installed TensorRT, two ONNX
Runtime distributions) end the run in one line. What the numbers mean on a real GPU is
docs/gpu-first-run.md's business; here the steps must succeed and the summary must read the reports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = (
    "import os\nfrom tests.fakes import installed\n"
    "FAKES = installed(os.environ.get('FAKE_TENSORRT', '10.3.0'))\nFAKES.__enter__()\n"
)
SMI = "Fake Orin, 550.54.15, 8.7, 8192 MiB"


def run_script(tmp_path: Path, *args: str, smi: str = SMI, **env: str) -> subprocess.CompletedProcess:
    """The script under the fakes, with stand-ins for nvidia-smi and pip (whose arguments go to pip.log)."""
    bin_dir, site = tmp_path / "bin", tmp_path / "site"
    bin_dir.mkdir()
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{smi}'\n")
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "pip.log"}\n')
    for tool in ("nvidia-smi", "pip"):
        (bin_dir / tool).chmod(0o755)
    environ = dict(os.environ, RUNS="2", BANDWIDTH_TBS="0.2", PIP=str(bin_dir / "pip"), **env)
    environ["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), environ["PATH"]])
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site)])
    environ["PYTHON"] = sys.executable
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_first_run.sh"), *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_first_run_script_runs_on_the_fakes_from_install_to_gpu_tests(tmp_path):
    result = run_script(tmp_path, "", str(tmp_path / "out"), INSTALL="1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for expected in (
        SMI,
        "tensorrt module  10.3.0",
        "1 GPU(s); device 0: {'name': 'Fake Orin'",
        "wrote bundle",  # no BUNDLE: the default model exported with torch
        "wrote engines to",
        "ar_step     TensorRT 10.3.0's parser: ok",
        "wrote the engine inspector's layer dumps",
        "CUDA graphs off batch 1: step p50 host",  # per-stage times from the eager runs
        "CUDA graph batch 1: generation p50 device",  # the whole generation as one replayed CUDA graph
        "memory floor at 0.2 TB/s",
    ):
        assert expected in output, expected
    assert " NO" not in output and (tmp_path / "out" / "class-3.png").is_file()
    # the GPU tests ran (on the fakes), after the summary, none skipped
    tests = output[output.index("9/9 the GPU tests") :]
    assert " passed" in tests and "skipped" not in tests and output.index("memory floor") < output.index("9/9")
    # one environment for every step: the machine's TensorRT extra, export for step 2, pytest; no dev extra
    (install,) = (tmp_path / "pip.log").read_text().splitlines()
    assert install == f"install -e {ROOT}[gpu-cu12,export] pytest"


@pytest.mark.parametrize(
    "fake_tensorrt, smi, site, error",
    [
        ("11.4.0", "Fake GPU, 530.30.02, 8.9, 24564 MiB", {}, "driver 530.30.02 is older than R535, which TensorRT"),
        ("11.4.0", "Fake Volta, 550.54.15, 7.0, 16384 MiB", {}, "is older than Turing (7.5), which TensorRT 11.4.0"),
        ("10.3.0", SMI, {"onnxruntime_gpu-1.26.0.dist-info": "onnxruntime-gpu"}, "onnxruntime and onnxruntime-gpu"),
    ],
    ids=["driver too old", "GPU too old", "two ONNX Runtimes"],
)
def test_a_stack_that_cannot_run_stops_at_step_one_in_one_line(tmp_path, fake_tensorrt, smi, site, error):
    for folder, name in site.items():  # an installed distribution, as importlib.metadata sees one
        (tmp_path / "site" / folder).mkdir(parents=True)
        (tmp_path / "site" / folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.26.0\n")
    result = run_script(tmp_path, "bundle", str(tmp_path / "out"), smi=smi, FAKE_TENSORRT=fake_tensorrt)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.returncode == 1 and len(errors) == 1 and error in errors[0], result.stdout + result.stderr
    assert "2/9" not in result.stdout and "Traceback" not in result.stderr
