"""The product path: export → bundle → ONNX Runtime generation, token-identical to PyTorch."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from imagefolder.configs import tiny
from imagefolder.core.bundle import load_bundle
from imagefolder.core.schedule import SamplingParams, num_positions
from imagefolder.export.onnx_export import export_bundle
from imagefolder.generate import generate as official_generate
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.backends.torch_backend import TorchBackend
from imagefolder.runtime.loop import ImageRequest, generate, run_batch
from tests.models import official_width, randomized


def _backends(config, tmp_path_factory, name):
    tokenizer, generator = randomized(config, seed=3)
    out = export_bundle(tmp_path_factory.mktemp(name), tokenizer, generator, config, progress=False)
    bundle = load_bundle(out)
    return bundle, OrtBackend(bundle), TorchBackend(tokenizer, generator, bundle.candidates), (tokenizer, generator)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return _backends(tiny(), tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def official_setup(tmp_path_factory):
    return _backends(official_width(depth=1), tmp_path_factory, "official")


def _assert_same(ort_result, torch_result):
    np.testing.assert_array_equal(ort_result.indices, torch_result.indices)
    assert np.abs(ort_result.images - torch_result.images).max() < 1e-4


def test_greedy_tokens_identical_ort_vs_torch_tiny(tiny_setup):
    _, ort_backend, torch_backend, _ = tiny_setup
    params = SamplingParams(cfg=2.5, top_k=1, top_p=1.0, seed=0)
    labels = np.array([0, 4, 9])
    ort_result = generate(ort_backend, labels, params)
    _assert_same(ort_result, generate(torch_backend, labels, params))
    assert ort_result.indices.shape == (3, 2, 66) and ort_result.indices.dtype == np.int32


def test_seeded_sampling_identical_ort_vs_torch_tiny(tiny_setup):
    _, ort_backend, torch_backend, _ = tiny_setup
    labels = np.array([1, 2])
    for params in (
        SamplingParams(cfg=3.25, top_k=40, top_p=0.9, seed=11),
        SamplingParams(cfg=0, top_k=256, top_p=1.0, seed=5),
    ):
        ort_result = generate(ort_backend, labels, params)
        _assert_same(ort_result, generate(torch_backend, labels, params))
    # A different seed changes the sample: the noise really drives the tokens.
    other = generate(ort_backend, labels, SamplingParams(cfg=0, top_k=256, top_p=1.0, seed=6))
    assert not np.array_equal(other.indices, ort_result.indices)


def test_sessions_are_reusable_on_every_backend(tiny_setup):
    _, ort_backend, torch_backend, _ = tiny_setup
    params = SamplingParams(cfg=1.0, top_k=30, seed=4)
    for backend in (ort_backend, torch_backend):
        session = backend.session(2)
        first = generate(backend, [5, 6], params, session=session)
        generate(backend, [1, 2], SamplingParams(seed=99), session=session)
        again = generate(backend, [5, 6], params, session=session)
        np.testing.assert_array_equal(first.indices, again.indices)
        session.close()


def test_runtime_greedy_equals_official_reference(tiny_setup):
    _, ort_backend, _, (tokenizer, generator) = tiny_setup
    labels = np.array([3, 7])
    result = generate(ort_backend, labels, SamplingParams(cfg=3.25, top_k=1, seed=0))
    _, indices = official_generate(generator, tokenizer, torch.as_tensor(labels), cfg=3.25, top_k=1, seed=0)
    np.testing.assert_array_equal(result.indices, indices.int().numpy())


def test_encode_decode_round_trip_ort_vs_torch(tiny_setup):
    _, ort_backend, torch_backend, _ = tiny_setup
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    indices = ort_backend.encode(images)
    np.testing.assert_array_equal(indices, torch_backend.encode(images))
    assert np.abs(ort_backend.decode(indices) - torch_backend.decode(indices)).max() < 1e-4


@pytest.mark.slow
def test_greedy_tokens_identical_official_width(official_setup):
    bundle, ort_backend, torch_backend, _ = official_setup
    assert num_positions(bundle.scales) == 286 and bundle.model["generator"]["width"] == 1088
    params = SamplingParams(cfg=3.25, top_k=1, seed=0)
    labels = np.array([207])
    ort_result = generate(ort_backend, labels, params)
    _assert_same(ort_result, generate(torch_backend, labels, params))
    sampled = SamplingParams(cfg=3.25, top_k=750, top_p=0.95, seed=1)
    np.testing.assert_array_equal(
        generate(ort_backend, labels, sampled).indices, generate(torch_backend, labels, sampled).indices
    )


def test_fp16_bundle_generates_like_fp32(tmp_path):
    config = tiny()
    tokenizer, generator = randomized(config, seed=3)
    half = OrtBackend(export_bundle(tmp_path / "16", tokenizer, generator, config, dtype="fp16", progress=False))
    full = OrtBackend(export_bundle(tmp_path / "32", tokenizer, generator, config, dtype="fp32", progress=False))
    assert half.bundle.state_dtype == "float16"
    params = SamplingParams(cfg=3.0, top_k=1, seed=0)
    a, b = generate(half, [0, 3, 7], params), generate(full, [0, 3, 7], params)
    # Stated tolerance: greedy tokens agree on ≥ 99% of positions, images within 2e-2.
    assert (a.indices == b.indices).mean() >= 0.99
    assert np.abs(a.images - b.images).max() < 2e-2


@pytest.fixture(scope="module")
def default_setup(tmp_path_factory):
    """The shipped default model on both backends, with a bundle whose batch maximum is 8."""
    from imagefolder.default_model import load_default_or_checkpoint

    config, tokenizer, generator, _ = load_default_or_checkpoint()
    out = export_bundle(tmp_path_factory.mktemp("default"), tokenizer, generator, config, batch_max=8, progress=False)
    return OrtBackend(load_bundle(out)), TorchBackend(tokenizer, generator, load_bundle(out).candidates)


@pytest.mark.parametrize("backend_name", ["ort", "torch"])
@pytest.mark.parametrize("params", [SamplingParams(top_k=1, top_p=1.0, seed=0), SamplingParams(seed=21)])
def test_an_image_does_not_depend_on_its_batch(default_setup, backend_name, params):
    """Image i of a request: the same tokens alone, in batches of 2, 4 and 8, and in a request split in two."""
    backend = default_setup[0 if backend_name == "ort" else 1]
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 10 images: above the bundle's batch maximum of 8
    whole = generate(backend, labels, params)  # split 8 + 2
    assert whole.indices.shape[0] == 10
    for size in (1, 2, 4, 8):  # image i of the request alone (i = 0) and in batches of 2, 4 and 8
        np.testing.assert_array_equal(generate(backend, labels[:size], params).indices, whole.indices[:size])
    with contextlib.closing(backend.session(4)) as session:  # a server's batch: images from anywhere in requests
        images = [ImageRequest(labels[i], params, i) for i in (7, 2, 9, 0)]
        mixed = run_batch(session, backend.scales, images)
        np.testing.assert_array_equal(mixed.indices, whole.indices[[7, 2, 9, 0]])


def test_requests_with_other_settings_share_a_batch(default_setup):
    """Per-image sampling settings: a batch of two requests with different cfg/top-k/top-p/seed gives each
    request's images exactly what they get alone."""
    ort_backend, _ = default_setup
    a, b = SamplingParams(cfg=1.0, top_k=5, top_p=0.8, seed=1), SamplingParams(cfg=4.0, top_k=200, top_p=1.0, seed=2)
    alone_a, alone_b = generate(ort_backend, [2, 3], a), generate(ort_backend, [7], b)
    with ort_backend.session(3) as session:
        both = run_batch(
            session, ort_backend.scales, [ImageRequest(2, a, 0), ImageRequest(7, b, 0), ImageRequest(3, a, 1)]
        )
    np.testing.assert_array_equal(both.indices, np.stack([alone_a.indices[0], alone_b.indices[0], alone_a.indices[1]]))


def test_the_sampler_graph_has_no_loop_and_takes_one_uniform_per_token(tiny_setup):
    bundle = tiny_setup[0]
    entry = bundle.manifest["graphs"]["sampler"]
    ops = set(entry["operators"]["counts"])
    assert not ops & {"CumSum", "Loop", "Sort", "Multinomial", "If", "Scan"}, ops
    assert {"TopK", "MatMul", "ScatterElements", "ArgMax"} <= ops
    uniforms = next(t for t in entry["inputs"] if t["name"] == "uniforms")
    assert uniforms["shape"] == ["B", "q", 2]  # no vocabulary axis


@pytest.mark.slow
def test_host_sends_a_few_kilobytes_per_image_at_official_shapes(official_setup):
    from imagefolder.runtime.profiler import profile_generation

    _, ort_backend, _, _ = official_setup
    report = profile_generation(ort_backend, [1], SamplingParams(), runs=1, warmup=0).reports[0]
    # 286 positions × 2 uniforms × 4 B + label + 10 guidance values + top-k + top-p + 286 × 2 reference tokens × 4 B
    # and their force flags × 1 B
    assert report["bytes_to_device_per_image"] == 286 * 2 * 4 + 8 + 10 * 4 + 8 + 4 + 286 * 2 * 5 <= 8 * 1024
    assert report["bytes_from_device_per_image"] == 3 * 256 * 256 * 4 + 2 * 286 * 4  # the image and its indices
