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
