"""Half-precision bundles through the whole TensorRT path on the fakes, version-compatible plans, builder units.

fp16 (what the docs recommend for d17) and bf16 bundles are built by both fake TensorRT versions, loaded, run
eagerly and as one CUDA graph at batch 1 and 4, with tokens identical to ONNX Runtime on the same bundle. An
fp16 bundle's cache, conditioning and f̂ are float16 at the engine boundary, so a binding read as float32 or a
cache element size taken as 4 bytes shows at once. A bf16 bundle keeps fp32 at the boundary and bf16 inside;
ONNX Runtime's CPU provider has no bf16 kernels, so both sides run its graphs as the fake's kernels do
(``tests/fakes/numerics.bf16_as_float32``: fp32 arithmetic, bf16 rounding where the graph casts).
Version-compatible plans load only with host code allowed; the workspace limit reaches TensorRT in bytes, as
``IBuilderConfig.set_memory_pool_limit`` takes it in 10.3 and 11.4.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.fakes import installed
from tests.test_trt_on_fakes import GREEDY, LABELS, SAMPLED, VERSIONS, generate

BATCHES = [1, 4]


def export(root, dtype: str):
    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from tests.models import randomized

    config = tiny()
    return export_bundle(root, *randomized(config), config, dtype=dtype, progress=False)


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    return export(tmp_path_factory.mktemp("fp16") / "bundle", "fp16")


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory):
    return export(tmp_path_factory.mktemp("bf16") / "bundle", "bf16")


def expected_tokens(bundle):
    from imagefolder.runtime.backends.ort import OrtBackend

    ort = OrtBackend(bundle)
    return {
        (batch, name): generate(ort, LABELS[batch], **params)
        for batch in BATCHES
        for name, params in (("greedy", GREEDY), ("sampled", SAMPLED))
    }


@pytest.fixture(scope="module")
def fp16_expected(fp16_bundle):
    return expected_tokens(fp16_bundle)


@pytest.fixture(scope="module")
def bf16_expected(bf16_bundle, tmp_path_factory):
    """ONNX Runtime on the bf16 bundle's graphs as the fake's kernels run them (CPU ONNX Runtime has no bf16)."""
    import onnx

    from imagefolder.core.bundle import load_bundle
    from tests.fakes.numerics import bf16_as_float32

    root = tmp_path_factory.mktemp("bf16-emulated") / "bundle"
    shutil.copytree(bf16_bundle, root)
    for path in root.glob("*.onnx"):
        onnx.save(bf16_as_float32(onnx.load(str(path))), str(path))
    return expected_tokens(load_bundle(root, verify=False))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_half_precision_bundle_runs_through_tensorrt_with_onnx_runtime_tokens(request, dtype, version, tmp_path):
    from imagefolder.export.trt_build import build_engines
    from imagefolder.runtime.backends.trt import TrtBackend

    root = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(f"{dtype}_bundle"), root)
    expected = request.getfixturevalue(f"{dtype}_expected")
    boundary = {"fp16": ("HALF", 2), "bf16": ("FLOAT", 4)}[dtype]  # bf16 bundles keep fp32 at the boundary
    with installed(version) as gpu:
        build_engines(root, batches=BATCHES, progress=False)
        step = gpu.plan_header((root / "engines" / "ar_step.plan").read_bytes())
        dtypes = {t["name"]: t["dtype"] for t in step["inputs"] + step["outputs"]}
        assert dtypes["past_keys_0"] == dtypes["keys"] == dtypes["cond_blocks"] == boundary[0]
        with TrtBackend(root) as backend:
            for batch in BATCHES:
                session = backend.session(batch)
                assert session.cache_esize == boundary[1]
                # eager, captured, replayed, replayed: each against ONNX Runtime on the same fp16 bundle
                for name, params in [("greedy", GREEDY), ("sampled", SAMPLED)] * 2:
                    result = generate(backend, LABELS[batch], session=session, **params)
                    want = expected[batch, name]
                    np.testing.assert_array_equal(result.indices, want.indices)
                    np.testing.assert_allclose(result.images, want.images, atol=1e-3)
                assert session.graph is not None
        assert not gpu.trt_errors() and not gpu.cuda.faults and gpu.cuda.sticky is None


def test_a_version_compatible_plan_loads_only_with_host_code_allowed(fp16_bundle, fp16_expected, tmp_path):
    """The lean runtime a version-compatible plan embeds is host code: TensorRT runs it only when the runtime
    allows it (``IRuntime.engine_host_code_allowed``, in the 10.3 and 11.4 listings); a plan built by 10.3 then
    loads under 11.4 too."""
    from imagefolder.export.trt_build import build_engines
    from imagefolder.runtime.backends.trt import TrtBackend

    root = tmp_path / "bundle"
    shutil.copytree(fp16_bundle, root)
    with installed("10.3.0") as gpu:
        build_engines(root, batches=[1], graphs=["sampler"], version_compat=True, progress=False)
        plan = (root / "engines" / "sampler.plan").read_bytes()
        assert "VERSION_COMPATIBLE" in gpu.plan_header(plan)["flags"]
        runtime = gpu.trt.Runtime(gpu.trt.Logger())
        assert runtime.deserialize_cuda_engine(plan) is None
        assert "engine_host_code_allowed" in gpu.trt_errors()[-1]
        runtime.engine_host_code_allowed = True
        assert runtime.deserialize_cuda_engine(plan) is not None
    assert json.loads((root / "engines" / "build.json").read_text())["flags"]["version_compat"] is True
    for version in VERSIONS:
        with installed(version) as gpu, TrtBackend(root, graphs=["sampler"]) as backend:
            assert backend.trt_runtime.engine_host_code_allowed is True
            assert set(backend.engines) == {"sampler"}
            assert not gpu.trt_errors()


@pytest.mark.parametrize("version", VERSIONS)
def test_the_workspace_limit_reaches_tensorrt_in_bytes(fp16_bundle, version, tmp_path):
    """``--workspace`` is MiB on the command line; ``set_memory_pool_limit(WORKSPACE, size)`` takes bytes in both
    versions. The fake records the pool as set, and a limit too small for any GEMM tactic fails the build."""
    from imagefolder.export.trt_build import EngineBuildError, build_engines

    root = tmp_path / "bundle"
    shutil.copytree(fp16_bundle, root)
    with installed(version) as gpu:
        build_engines(root, batches=[1], graphs=["sampler", "ar_prefill"], workspace_mib=64, progress=False)
        header = gpu.plan_header((root / "engines" / "ar_prefill.plan").read_bytes())
        assert header["memory_pools"] == {"WORKSPACE": 64 * 2**20}
        assert not gpu.trt_errors()
    with installed(version) as gpu, pytest.raises(EngineBuildError):
        build_engines(root, batches=[1], graphs=["ar_prefill"], workspace_mib=0, progress=False)
    assert any("Could not find any implementation" in e for e in gpu.trt_errors())
