"""The GPU extras of pyproject.toml pin one mutually consistent stack each.

Resolving them needs NVIDIA's index and every platform, which no test has (docs/gpu-first-run.md shows
the resolution run by hand, and what it printed). What a test can hold is the rules the pins must obey:

- ``gpu-cu12`` / ``gpu-cu13``: TensorRT only as ``tensorrt-cu<major>`` (never the bare ``tensorrt``
  metapackage, which follows the newest CUDA), within the majors the code supports (10, 11);
  cuda-python bounded to the same CUDA major; onnxruntime-gpu only within the releases PyPI built for
  that CUDA (<= 1.26: CUDA 12, >= 1.27: CUDA 13) and only where PyPI has it (x86_64); polygraphy and onnx.
- ``jetson``: no TensorRT from PyPI (JetPack's comes from apt), cuda-python 12.6.x (JetPack 6's CUDA 12.6).
- ``gpu``: an alias of exactly one of the CUDA extras.
- every requirement has an upper bound where a new major would change the CUDA or the API.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
CUDA_EXTRAS = {"gpu-cu12": 12, "gpu-cu13": 13}
# onnxruntime-gpu releases on PyPI by the CUDA they were built for (read from each wheel's nvidia-* requirements).
ORT_GPU_CUDA = {12: SpecifierSet(">=1.19,<1.27"), 13: SpecifierSet(">=1.27")}


def requirements(extra: str) -> dict[str, Requirement]:
    return {Requirement(text).name.lower().replace("_", "-"): Requirement(text) for text in EXTRAS[extra]}


def allowed_majors(requirement: Requirement, candidates: range) -> set[int]:
    """The major versions ``requirement`` admits, probing x.0 through x.999 of each candidate major."""
    return {
        major
        for major in candidates
        if any(Version(f"{major}.{minor}") in requirement.specifier for minor in (0, 1, 6, 9, 99, 999))
    }


@pytest.mark.parametrize("extra", list(CUDA_EXTRAS))
def test_a_cuda_extra_pins_one_cuda_major(extra):
    cuda = CUDA_EXTRAS[extra]
    reqs = requirements(extra)
    tensorrt = [name for name in reqs if name.startswith("tensorrt")]
    assert tensorrt == [f"tensorrt-cu{cuda}"], f"{extra} must take TensorRT only as tensorrt-cu{cuda}: {tensorrt}"
    assert allowed_majors(reqs[f"tensorrt-cu{cuda}"], range(8, 14)) <= {10, 11}
    assert allowed_majors(reqs["cuda-python"], range(11, 16)) == {cuda}
    ort = reqs["onnxruntime-gpu"]
    assert ort.marker is not None and ort.marker.evaluate({"platform_machine": "x86_64"})
    assert not ort.marker.evaluate({"platform_machine": "aarch64"})  # PyPI has no aarch64 onnxruntime-gpu
    released = [Version(v) for v in ("1.19.0", "1.23.2", "1.26.0", "1.27.0", "1.31.1")]
    admitted = [v for v in released if v in ort.specifier]
    assert admitted and all(v in ORT_GPU_CUDA[cuda] for v in admitted), f"{extra}: onnxruntime-gpu {admitted}"
    assert {"polygraphy", "onnx"} <= set(reqs)
    assert reqs["onnxruntime"].marker is not None and not reqs["onnxruntime"].marker.evaluate(
        {"platform_machine": "x86_64"}
    )


def test_the_jetson_extra_takes_tensorrt_from_jetpack_and_cuda_12_6():
    reqs = requirements("jetson")
    assert not [name for name in reqs if name.startswith("tensorrt")]
    cuda_python = reqs["cuda-python"].specifier
    assert Version("12.6.0") in cuda_python and Version("12.6.2.post1") in cuda_python
    assert Version("12.5.0") not in cuda_python and Version("12.8.0") not in cuda_python
    assert {"polygraphy", "onnx", "onnxruntime"} <= set(reqs)  # the CPU build: all the engine check needs


def test_gpu_is_an_alias_of_one_cuda_extra():
    (alias,) = EXTRAS["gpu"]
    assert Requirement(alias).name == "imagefolder" and Requirement(alias).extras <= set(CUDA_EXTRAS)


def test_polygraphy_is_the_same_in_every_extra_and_pinned_for_the_tests():
    dev = requirements("dev")["polygraphy"].specifier
    (pinned,) = [Version(s.version) for s in dev if s.operator == "=="]
    for extra in [*CUDA_EXTRAS, "jetson"]:
        spec = requirements(extra)["polygraphy"].specifier
        assert pinned in spec and Version(f"{pinned.major}.{pinned.minor + 1}") not in spec, extra


# -- ONNX Runtime: one distribution per environment --------------------------------------------------------------

ORT_NAMES = {"onnxruntime", "onnxruntime-gpu"}
X86 = {"platform_machine": "x86_64", "sys_platform": "linux", "python_version": "3.11"}
GPU_EXTRAS = [*CUDA_EXTRAS, "gpu"]


def ort_distributions(extras: list[str], machine: str = "x86_64") -> set[str]:
    """The ONNX Runtime distributions ``pip install -e '.[extras]'`` asks for directly on ``machine``."""
    names: set[str] = set()
    for extra in extras:
        for name, requirement in requirements(extra).items():
            if name == "imagefolder":
                names |= ort_distributions(sorted(requirement.extras), machine)
            elif name in ORT_NAMES and (
                requirement.marker is None
                or requirement.marker.evaluate({**X86, "platform_machine": machine, "extra": extra})
            ):
                names.add(name)
    return names


def test_only_ort_brings_the_cpu_onnxruntime_and_only_the_gpu_extras_onnxruntime_gpu():
    assert ort_distributions(["ort"]) == {"onnxruntime"}
    assert ort_distributions(["jetson"]) == {"onnxruntime"}  # JetPack: the CPU build (docs/jetson.md)
    for extra in GPU_EXTRAS:
        assert ort_distributions([extra]) == {"onnxruntime-gpu"}, extra
        assert ort_distributions([extra], "aarch64") == {"onnxruntime"}, extra  # PyPI has no aarch64 GPU build
    for extra in set(EXTRAS) - {"ort", "jetson", *GPU_EXTRAS}:
        assert not ort_distributions([extra]), f"{extra} brings {ort_distributions([extra])}"


@pytest.mark.parametrize("others", [["export"], ["export", "dev"], ["train", "dev", "bench"]])
@pytest.mark.parametrize("gpu", GPU_EXTRAS)
def test_a_gpu_install_path_never_asks_for_both_distributions(gpu, others):
    assert ort_distributions([gpu, *others]) == {"onnxruntime-gpu"}


def test_no_installed_dependency_of_the_other_extras_requires_onnxruntime():
    """Transitively, where installed here: onnxscript, onnx, polygraphy, tritonclient, torch, matplotlib..."""
    import importlib.metadata

    from packaging.requirements import Requirement as Req

    seen, todo = set(), [name for extra in ("export", "dev", "train", "bench") for name in requirements(extra)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Req(text)
            if req.marker is None or req.marker.evaluate({**X86, "extra": ""}):
                assert req.name.lower() not in ORT_NAMES, f"{name} requires {text}"
                todo.append(req.name.lower().replace("_", "-"))
    assert "torch" in seen and "onnxscript" in seen


def test_the_makefile_installs_onnxruntime_for_the_tests():
    makefile = (ROOT / "Makefile").read_text()
    assert "'.[export,ort,train,dev,serve]'" in makefile  # ort: the suite runs ONNX Runtime; dev no longer brings it


def test_both_distributions_installed_warn_once_with_the_fix(monkeypatch, caplog):
    import importlib.metadata

    from imagefolder.core import gpu_stack
    from imagefolder.install import install_command

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.22.0")  # both "installed"
    monkeypatch.setattr(gpu_stack, "_warned_about_ort", False)
    with caplog.at_level("WARNING", logger="imagefolder"):
        assert gpu_stack.warn_if_both_onnxruntimes() and gpu_stack.warn_if_both_onnxruntimes()
    (record,) = caplog.records
    message = record.getMessage()
    assert "onnxruntime and onnxruntime-gpu are both installed" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message and install_command("ort") in message


def test_one_distribution_installed_does_not_warn(monkeypatch, caplog):
    import importlib.metadata

    from imagefolder.core import gpu_stack

    real = importlib.metadata.version

    def only_cpu(name: str) -> str:
        if name == "onnxruntime-gpu":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name) if name != "onnxruntime" else "1.22.0"

    monkeypatch.setattr(importlib.metadata, "version", only_cpu)
    monkeypatch.setattr(gpu_stack, "_warned_about_ort", False)
    with caplog.at_level("WARNING", logger="imagefolder"):
        assert not gpu_stack.warn_if_both_onnxruntimes()
    assert not caplog.records


# -- resolving with pip, where the registry allows -----------------------------------------------------------------


def _registry_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def throwaway_venv(tmp_path_factory):
    """An empty virtual environment for ``pip --python ... install --dry-run`` (nothing is installed anywhere)."""
    if not _registry_reachable():
        pytest.skip("PyPI is not reachable from here: the resolution tests need the registry")
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("throwaway") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    return folder / "bin" / "python"


def dry_run(python, *arguments: str, cwd=ROOT) -> tuple[set[str], str]:
    """The distributions ``pip install --dry-run *arguments`` would install into ``python``'s environment."""
    import json
    import subprocess
    import sys

    report = python.parent.parent / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            *arguments,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower() for item in installs}, result.stderr


def test_every_non_ort_extra_resolves_without_any_onnxruntime(throwaway_venv):
    """The full resolution of export, dev, train and bench (torch included) brings no ONNX Runtime at all, so
    `.[export,gpu-cu12,dev]` holds onnxruntime-gpu alone. (The GPU extras themselves cannot be resolved
    here: TensorRT's wheels come from pypi.nvidia.com, which this machine cannot reach.)"""
    names, _ = dry_run(throwaway_venv, "-e", f"{ROOT}[export,dev,train,bench]")
    assert {"imagefolder", "torch", "onnxscript", "matplotlib"} <= names
    assert not names & ORT_NAMES, names & ORT_NAMES


def test_the_serve_extra_keeps_numpy_2_and_the_makefile_brings_the_server_without_its_pins():
    """nvidia-pytriton 0.7.0 declares numpy<2, and its 2.51 stub dies serving our model under numpy 1: the
    extra must not list it (pip would downgrade numpy), and `make setup` installs it with --no-deps, the
    version the runtime names in its install hint (and docs/triton.md shows)."""
    from imagefolder.runtime.triton_server import INSTALL, SERVER_WHEEL

    reqs = requirements("serve")
    assert "nvidia-pytriton" not in reqs and "perf-analyzer" not in reqs  # see pyproject's comment
    assert reqs["tritonclient"].extras == {"http", "grpc"} and allowed_majors(reqs["tritonclient"], range(1, 5)) == {2}
    assert Version("1.26.4") not in reqs["numpy"].specifier and Version("2.4.6") in reqs["numpy"].specifier
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install -q --no-deps '{SERVER_WHEEL}'" in makefile and ",serve]" in makefile
    docs = (ROOT / "docs" / "triton.md").read_text()
    assert INSTALL in docs and f"pip install --no-deps '{SERVER_WHEEL}'" == INSTALL
