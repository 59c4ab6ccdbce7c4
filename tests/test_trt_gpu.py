"""TensorRT on a real GPU: engines build from an exported bundle, greedy generation is token-identical to
ONNX Runtime, CUDA graphs change nothing but speed, mismatched engines are refused.

Skipped with the reason only where TensorRT, cuda-python or a CUDA GPU is absent (CI); any other failure of
the probe (a driver older than cuda-python's CUDA, a TensorRT that does not import) fails the run
(``tests/gpu_probe.py``). Per-step latency is measured and logged here, never asserted (see DESIGN.md,
Testing); ``bench/`` owns performance numbers.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.gpu_probe import skip_reason

log = logging.getLogger(__name__)

SKIP = skip_reason()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

BATCHES = [1, 2]
GREEDY = {"cfg": 1.5, "top_k": 1, "top_p": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines
    from tests.models import randomized

    config = tiny()
    tokenizer, generator = randomized(config)
    root = export_bundle(tmp_path_factory.mktemp("trt"), tokenizer, generator, config, dtype="fp32", progress=False)
    build_engines(root, batches=BATCHES, progress=False, tf32=False)  # fp32 parity with ONNX Runtime
    return root


@pytest.fixture(scope="module")
def ort_backend(bundle):
    from imagefolder.runtime.backends.ort import OrtBackend

    return OrtBackend(bundle)


def _generate(backend, labels, session=None, **params):
    from imagefolder.core.schedule import SamplingParams
    from imagefolder.runtime.loop import generate

    return generate(backend, labels, SamplingParams(**params), session=session)


def test_engines_and_record(bundle):
    from imagefolder.io import sha256_file

    record = json.loads((bundle / "engines" / "build.json").read_text())
    assert set(record["graphs"]) == {"encoder", "decoder", "ar_prefill", "ar_step", "sampler", "fold"}
    assert record["batches"] == BATCHES and record["flags"]["strongly_typed"]
    for entry in record["graphs"].values():
        assert sha256_file(bundle / entry["file"]) == entry["sha256"]
    assert len(record["graphs"]["ar_step"]["profiles"]) == len(BATCHES) * 5  # tiny: 5 scales, 0 included
    assert (bundle / "engines" / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize("use_cuda_graphs", [True, False])
def test_greedy_generation_matches_ort(bundle, ort_backend, use_cuda_graphs):
    from imagefolder.runtime.backends.trt import TrtBackend

    labels = [1, 7]
    expected = _generate(ort_backend, labels, **GREEDY)
    with TrtBackend(bundle, use_cuda_graphs=use_cuda_graphs) as backend:
        session = backend.session(len(labels))  # graphs belong to a session: a new one per call would never replay
        for _ in range(3):  # first run: normal + capture; later runs: replay
            result = _generate(backend, labels, session=session, **GREEDY)
            np.testing.assert_array_equal(result.indices, expected.indices)
            np.testing.assert_allclose(result.images, expected.images, atol=2e-3)


def test_sampled_generation_matches_ort(bundle, ort_backend):
    # Same noise on both sides; identical tokens hold up to last-bit rounding (see imagefolder/core/sampler.py).
    from imagefolder.runtime.backends.trt import TrtBackend

    params = {"cfg": 2.0, "top_k": 20, "top_p": 0.9, "seed": 3}
    expected = _generate(ort_backend, [4], **params)
    with TrtBackend(bundle) as backend:
        result = _generate(backend, [4], **params)
    agree = (result.indices == expected.indices).mean()
    assert agree > 0.99, f"only {agree:.1%} of tokens agree with ONNX Runtime"


def test_encode_decode_match_ort(bundle, ort_backend):
    from imagefolder.runtime.backends.trt import TrtBackend

    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    with TrtBackend(bundle) as backend:
        indices = backend.encode(images)
        assert (indices == ort_backend.encode(images)).mean() > 0.99
        np.testing.assert_allclose(backend.decode(indices), ort_backend.decode(indices), atol=2e-3)


def test_step_latency_with_and_without_cuda_graphs(bundle):
    from imagefolder.core.schedule import SamplingParams
    from imagefolder.runtime.backends.trt import TrtBackend
    from imagefolder.runtime.loop import generate

    for use_cuda_graphs in (False, True):
        with TrtBackend(bundle, use_cuda_graphs=use_cuda_graphs) as backend:
            session = backend.session(1)
            for _ in range(2):
                generate(backend, [0], SamplingParams(seed=1), session=session)
            session.device_timer.collect()  # discard warm-up
            timer = session.device_timer
            for _ in range(3):
                timer.start("run")
                generate(backend, [0], SamplingParams(seed=1), session=session)
                timer.stop("run")
            times = [ms for label, ms in timer.collect() if label == "run"]
            assert len(times) == 3 and all(t > 0 for t in times)
            log.warning(
                "TensorRT tiny model, batch 1, CUDA graphs %s: %.3f ms per image (median of 3)",
                "on" if use_cuda_graphs else "off",
                float(np.median(times)),
            )
            session.close()


def test_layer_profile_and_inspector(bundle, tmp_path):
    from imagefolder.runtime.backends.trt import TrtBackend

    with TrtBackend(bundle, layer_profile=True) as backend:
        assert not backend.use_cuda_graphs
        _generate(backend, [2], **GREEDY)
        times = backend.layer_times()
        assert times["ar_step"] and all(v for v in times["ar_step"].values())
        paths = backend.inspect(tmp_path)
        assert {p.name for p in paths} >= {"ar_step.engine.json"}
        json.loads((tmp_path / "ar_step.engine.json").read_text())


def test_mismatched_engines_are_refused(bundle, tmp_path):
    import shutil

    from imagefolder.core.engines import EngineMismatch
    from imagefolder.runtime.backends.trt import TrtBackend

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    record_path = copy / "engines" / "build.json"
    record = json.loads(record_path.read_text())
    record["gpu"]["name"] = "Some Other GPU"
    record_path.write_text(json.dumps(record))
    with pytest.raises(EngineMismatch, match="imagefolder-export trt"):
        TrtBackend(copy)


def test_unbuilt_batch_is_refused(bundle):
    from imagefolder.errors import EngineError
    from imagefolder.runtime.backends.trt import TrtBackend

    with TrtBackend(bundle) as backend, pytest.raises(EngineError, match="rebuild with"):
        backend.session(3)
