"""The GPU's tolerance checks against engines that round as a GPU does (tests/fakes/numerics.py).

With ``installed(tf32_rounding=True)`` the fake's engines built with TensorRT's default TF32 flag read both
operands of every fp32 matrix product with a 10-bit mantissa. Against them: ``imagefolder-export check
--backend trt`` (runtime/engine_check.py with core/compare.py's "TensorRT against ONNX Runtime" tolerances)
must pass with errors that are really there, and greedy tokens on the official-width model (C=1088, 17
heads, V=4096, all ten scales; depth 1 to stay fast) must stay ONNX Runtime's.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import installed
from tests.fakes.numerics import round_tf32
from tests.test_trt_on_fakes import GREEDY, generate


def test_tf32_rounding_keeps_ten_mantissa_bits_to_nearest_even():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(100_000) * 10.0 ** rng.integers(-20, 20, 100_000), [0.0, -0.0]])
    values = values.astype(np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    # the reference: add half an ulp of TF32 (less one when the kept lowest bit is even), drop 13 bits
    nearest_even = ((bits + 0x0FFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)).astype(np.uint32).view(np.float32)
    rounded = round_tf32(values)
    np.testing.assert_array_equal(rounded, nearest_even)
    assert not (rounded.view(np.uint32) & 0x1FFF).any()
    assert np.abs(rounded - values).max() > 0


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines
    from tests.models import randomized

    root = export_bundle(tmp_path_factory.mktemp("tf32") / "b", *randomized(tiny()), tiny(), progress=False)
    with installed(tf32_rounding=True):
        build_engines(root, batches=[1], progress=False)  # TF32 on: TensorRT's default
    return root


def test_tf32_engines_pass_the_engine_check_with_errors_that_are_there(tiny_fp32):
    """fp32 engines within 1e-3 of ONNX Runtime (compare.TOLERANCES["ort"]["fp32"]) although TF32 changed them."""
    from imagefolder.core.compare import TOLERANCES
    from runtime.engine_check import check_engines

    with installed(tf32_rounding=True) as gpu:
        report = check_engines(tiny_fp32)
        assert not gpu.trt_errors() and not gpu.cuda.faults
    failing = [row for row in report.rows if not row["ok"]]
    assert not failing, failing
    relative = [row["value"] for row in report.rows if row["metric"] == "max_rel"]
    assert max(relative) <= TOLERANCES["ort"]["fp32"]["relative"]
    assert max(relative) > 1e-6  # the engines rounded: an exact fake would give (almost) 0 here


@pytest.fixture(scope="module")
def official_fp32(tmp_path_factory):
    """The official-width model (depth 1), fp32, with TF32 engines for batch 2."""
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines
    from tests.models import official_width, randomized

    config = official_width(depth=1)
    root = export_bundle(tmp_path_factory.mktemp("official") / "b", *randomized(config), config, progress=False)
    with installed(tf32_rounding=True) as gpu:
        build_engines(root, batches=[2], progress=False)
        assert "TF32" in gpu.plan_header((root / "engines" / "ar_step.plan").read_bytes())["flags"]
        assert "TF32" not in gpu.plan_header((root / "engines" / "sampler.plan").read_bytes())["flags"]
    return root


@pytest.mark.slow
def test_greedy_tokens_on_the_official_width_model_survive_tf32(official_fp32):
    """1144 greedy tokens (2 images × 2 branches × 286 positions) identical to ONNX Runtime: TF32's relative
    error (≈ 1e-4 per product) does not reach the gap between the best and second-best logit of this model.
    Images differ by the decoder's own TF32 rounding: within 2e-3 of [-1, 1]."""
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.backends.trt import TrtBackend

    labels = [3, 500]
    want = generate(OrtBackend(official_fp32), labels, **GREEDY)
    with installed(tf32_rounding=True), TrtBackend(official_fp32, use_cuda_graphs=False) as backend:
        got = generate(backend, labels, **GREEDY)
    assert got.indices.size == 1144
    np.testing.assert_array_equal(got.indices, want.indices)
    difference = np.abs(got.images - want.images).max()
    assert 0 < difference < 2e-3


@pytest.mark.slow
def test_the_engine_check_judges_tf32_engines_by_their_own_row(official_fp32):
    """At the official width, TF32 flips more of the encoder's nearest-code choices than exact fp32's limit
    (1 %) allows; the check judges fp32 engines built with TF32 by the "tf32" row (as fp16: 10 %), and passes.
    The sampler is built without TF32 (``trt_build.EXACT_FP32_GRAPHS``): with it, its cumulative sums (matrix
    products) moved the draw boundaries and sampled tokens at the last scale differed beyond 1e-3."""
    from imagefolder.core.compare import TOLERANCES
    from runtime.engine_check import check_engines

    with installed(tf32_rounding=True) as gpu:
        report = check_engines(official_fp32)
        assert not gpu.trt_errors() and not gpu.cuda.faults
    assert all(row["ok"] for row in report.rows), [row for row in report.rows if not row["ok"]]
    (encoder,) = [row for row in report.rows if row["graph"] == "encoder"]
    assert TOLERANCES["ort"]["fp32"]["indices"] < encoder["value"] <= encoder["tolerance"] == 0.1
    assert max(row["value"] for row in report.rows if row["metric"] == "max_rel") > 1e-4
