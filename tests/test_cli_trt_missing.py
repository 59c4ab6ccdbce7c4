"""Every command of the TensorRT path says in one line which extra to install when a package it needs is missing.

``imagefolder-export trt | check --backend trt | triton`` and ``imagefolder generate | profile --backend trt``
run on the fakes (tests/fakes) with one package hidden (``None`` in ``sys.modules``: ``import`` then fails
as if it were not installed). Where the path needs the package: exit 1, one ``Error:`` line, no traceback,
naming the package and what installs it on this kind of machine (the extra for its driver's CUDA, or
JetPack's apt package for TensorRT on a Jetson). Where it does not, the command succeeds without it.
The fakes themselves need onnx and ONNX Runtime, so those two are hidden only on paths that stop first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagefolder.cli.export import main as export_main
from imagefolder.cli.main import main
from imagefolder.core import gpu_stack
from imagefolder.install import install_command
from tests.fakes import installed

MODULES = {
    "tensorrt": ("tensorrt",),
    "cuda-python": ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"),
    "polygraphy": ("polygraphy",),
    "onnxruntime": ("onnxruntime",),
    "onnx": ("onnx",),
}
NAMED = {"tensorrt": "TensorRT", "cuda-python": "cuda-python", "polygraphy": "polygraphy"}
NAMED |= {"onnxruntime": "ONNX Runtime", "onnx": "onnx"}
MACHINES = {"CUDA 12 driver": (False, (12, 8)), "CUDA 13 driver": (False, (13, 1)), "Jetson": (True, (12, 6))}
EXTRA = {"CUDA 12 driver": "gpu-cu12", "CUDA 13 driver": "gpu-cu13", "Jetson": "jetson"}

# Command → the packages it cannot run without (each hidden in turn) and those it runs without (hidden together).
NEEDS = {
    "trt": ["tensorrt", "cuda-python"],
    "check": ["tensorrt", "cuda-python", "polygraphy", "onnxruntime"],
    "check --debug": ["onnx"],
    "generate": ["tensorrt", "cuda-python"],
    "profile": ["tensorrt", "cuda-python"],
}
RUNS_WITHOUT = {
    "trt": ["polygraphy"],
    "generate": ["polygraphy"],
    "profile": ["polygraphy"],
    "triton": list(MODULES),
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The tiny model exported, with engines built by the fake TensorRT 10.3 on the fake GPU."""
    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines
    from tests.models import randomized

    config = tiny()
    tokenizer, generator = randomized(config)
    root = export_bundle(tmp_path_factory.mktemp("missing"), tokenizer, generator, config, progress=False)
    with installed():
        build_engines(root, batches=[1], progress=False)
    return root


def _invoke(command: str, bundle: Path, tmp_path: Path):
    copy = shutil.copytree(bundle, tmp_path / "bundle")  # trt rewrites engines/: each run gets its own bundle
    args = {
        "trt": (export_main, ["trt", copy, "--batch", "1"]),
        "check": (export_main, ["check", copy, "--backend", "trt"]),
        "check --debug": (export_main, ["check", copy, "--backend", "trt", "--debug", tmp_path / "debug"]),
        "triton": (export_main, ["triton", copy, "--out", tmp_path / "repo"]),
        "generate": (
            main,
            ["generate", "--bundle", copy, "--backend", "trt", "--class", "3", "-o", tmp_path / "a.png"],
        ),
        "profile": (main, ["profile", "--bundle", copy, "--backend", "trt", "--runs", "1", "--warmup", "0"]),
    }
    group, argv = args[command]
    return CliRunner().invoke(group, [str(a) for a in argv], catch_exceptions=False)


def _hide(monkeypatch, packages) -> None:
    for package in packages:
        for module in MODULES[package]:
            monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("machine", list(MACHINES))
@pytest.mark.parametrize("command, package", [(c, p) for c, needed in NEEDS.items() for p in needed])
def test_a_missing_package_is_one_line_naming_what_installs_it(
    bundle, tmp_path, monkeypatch, machine, command, package
):
    jetson, driver = MACHINES[machine]
    monkeypatch.setattr(gpu_stack, "is_jetson", lambda: jetson)
    monkeypatch.setattr(gpu_stack, "driver_cuda_version", lambda: driver)
    with installed(), monkeypatch.context() as hidden:
        _hide(hidden, [package])
        result = _invoke(command, bundle, tmp_path)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"{NAMED[package]} is not installed" in errors[0], errors[0]
    if package == "tensorrt" and machine == "Jetson":
        assert "sudo apt install python3-libnvinfer" in errors[0], errors[0]
    else:
        assert install_command(EXTRA[machine]) in errors[0], errors[0]


@pytest.mark.parametrize("command", list(RUNS_WITHOUT))
def test_a_path_runs_without_the_packages_it_does_not_need(bundle, tmp_path, monkeypatch, command):
    with installed(), monkeypatch.context() as hidden:
        _hide(hidden, RUNS_WITHOUT[command])
        result = _invoke(command, bundle, tmp_path)
    assert result.exit_code == 0, result.output


def test_a_fresh_interpreter_without_polygraphy_gets_the_same_one_line_error(bundle, tmp_path):
    """Nothing the check imports at module level needs polygraphy: in a new process too, one line and exit 1."""
    code = (
        "import sys; from tests.fakes import installed; installed().__enter__(); sys.modules['polygraphy'] = None; "
        "from imagefolder.cli.export import main; "
        f"main(['check', {str(shutil.copytree(bundle, tmp_path / 'b'))!r}, '--backend', 'trt'])"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("Error: polygraphy is not installed"), result.stderr
