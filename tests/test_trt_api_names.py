"""Every TensorRT name the builder and the TensorRT backend use exists in TensorRT 10.3 and 11.4.

TensorRT cannot be installed here, so the check reads the API listings taken from the real 10.3.0 and
11.4.0 bindings wheels (``tests/data/tensorrt-api``). It walks the source (ast) and collects:

- ``trt.X`` and ``trt.X.Y`` (also through ``self.trt``);
- every attribute read, written or called on a TensorRT object: by convention those are named
  ``trt_*`` (``trt_builder``, ``trt_config``, ``trt_engine``, ``trt_context``, ...);
- the methods of classes that subclass a ``trt.X`` interface (``IProfiler``, ``IProgressMonitor``).

Each name must exist in both versions, except the names reached through
``trt_build._versioned(trt, "Class.MEMBER")``: those must be listed in ``trt_build.VERSIONED_NAMES``
and exist in each major version listed there.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from imagefolder.export.trt_build import VERSIONED_NAMES
from tests.reference import TENSORRT_API

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "export" / "trt_build.py", *sorted((ROOT / "runtime" / "backends" / "trt").glob("*.py")))
VERSIONS = {"10.3": 10, "11.4": 11}


class Api:
    """The names of one TensorRT version (identifier strings, documented methods and properties)."""

    def __init__(self, folder: Path, version: str):
        self.identifiers = set((folder / f"identifiers-{version}.txt").read_text().split())
        methods = json.loads((folder / f"methods-{version}.json").read_text())
        self.documented = {m for names in methods.values() for m in names} | set(methods)
        self.documented |= set((folder / f"properties-{version}.txt").read_text().split())

    def has(self, name: str) -> bool:
        # The linker merges string tails: a short name may appear only as the end of a longer one.
        return (
            name in self.identifiers
            or name in self.documented
            or any(ident.endswith(name) for ident in self.identifiers)
        )


@pytest.fixture(scope="module")
def apis() -> dict[str, Api]:
    folder = TENSORRT_API
    return {v: Api(folder, v) for v in VERSIONS}


# ---------------------------------------------------------------------------------------------------------------------
# Collection


def _is_trt_module(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "trt") or (isinstance(node, ast.Attribute) and node.attr == "trt")


def _is_trt_object(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id.startswith("trt_")) or (
        isinstance(node, ast.Attribute) and node.attr.startswith("trt_")
    )


def _module_chain(node: ast.Attribute) -> list[str] | None:
    """``trt.A.B`` → ["A", "B"]; None if the chain is not rooted at the tensorrt module."""
    parts = []
    while isinstance(node, ast.Attribute):
        if _is_trt_module(node.value):
            return [node.attr] + parts[::-1]
        parts.append(node.attr)
        node = node.value
    return None


def collect(source: str) -> dict[str, set[str]]:
    """{"module": {"A", "A.B"}, "object": {"method"}, "override": {"report_layer_time"}, "versioned": {...}}."""
    tree = ast.parse(source)
    found = {"module": set(), "object": set(), "override": set(), "versioned": set()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if _is_trt_module(node.value):
                chain = _module_chain(node)
            else:
                chain = _module_chain(node) if isinstance(node.value, ast.Attribute) else None
            chain = [part for part in chain or [] if not part.startswith("__")]
            if chain:
                found["module"].add(".".join(chain[:2]))
            if _is_trt_object(node.value) and not node.attr.startswith("__"):
                found["object"].add(node.attr)
        elif isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Attribute) and _is_trt_module(b.value) for b in node.bases
        ):
            found["override"] |= {
                f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")
            }
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_versioned":
            arg = node.args[1]
            assert isinstance(arg, ast.Constant), "_versioned takes a literal name, so it can be checked"
            found["versioned"].add(arg.value)
    return found


@pytest.fixture(scope="module")
def used() -> dict[str, set[str]]:
    total = {"module": set(), "object": set(), "override": set(), "versioned": set()}
    for path in SOURCES:
        for kind, names in collect(path.read_text()).items():
            total[kind] |= names
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_collector_sees_the_calls_that_matter(used):
    # Guards the collector itself: if naming drifted (a TensorRT object not named trt_*), these vanish.
    assert {
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
        "OnnxParser",
        "BuilderFlag.GPU_FALLBACK",
        "ExecutionContextAllocationStrategy.USER_MANAGED",
        "LayerInformationFormat.JSON",
    } <= used["module"]
    assert {
        "parse_from_file",
        "build_serialized_network",
        "set_memory_pool_limit",
        "create_timing_cache",
        "deserialize_cuda_engine",
        "set_optimization_profile_async",
        "set_input_shape",
        "set_tensor_address",
        "execute_async_v3",
        "get_device_memory_size_for_profile_v2",
        "profiler",
    } <= used["object"]
    assert {"report_layer_time", "phase_start", "step_complete", "phase_finish"} <= used["override"]


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_every_unversioned_name_exists(apis, used, version):
    api = apis[version]
    missing = sorted(
        [f"trt.{n}" for n in used["module"] if not all(api.has(part) for part in n.split("."))]
        + [f"<trt object>.{n}" for n in used["object"] | used["override"] if not api.has(n)]
    )
    assert not missing, f"not in TensorRT {version}: {missing}"


def test_versioned_names(apis, used):
    assert used["versioned"] <= set(VERSIONED_NAMES), "every _versioned name must be declared in VERSIONED_NAMES"
    for name, majors in VERSIONED_NAMES.items():
        for version, major in VERSIONS.items():
            present = all(apis[version].has(part) for part in name.split("."))
            if major in majors:
                assert present, f"{name} is declared for TensorRT {major} but is not in {version}"


def test_check_catches_removed_names(apis):
    # Names removed in 11 (or absent in 10.3) are reported: the check is not vacuous.
    bad = collect(
        "trt.BuilderFlag.FP16\ntrt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH\n"
        "trt_engine.device_memory_size\ntrt_builder.platform_has_fast_fp16\n"
        "trt_network.add_kv_cache_update\n"
    )
    assert {"BuilderFlag.FP16", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"} <= bad["module"]
    assert bad["object"] == {"device_memory_size", "platform_has_fast_fp16", "add_kv_cache_update"}
    assert not apis["11.4"].has("EXPLICIT_BATCH")
    assert not apis["11.4"].has("platform_has_fast_fp16") and not apis["11.4"].has("device_memory_size")
    assert not apis["10.3"].has("add_kv_cache_update")
