"""The TensorRT session's KV cache, checked where a bug in it cannot hide: its contents after every scale against
the PyTorch model's own cache, and tokens on a model whose attention leans on the cache (``cache_sensitive``).

A cache bug that changes one token in a hundred passes a token test by luck of the model; here every layer,
position and row of the cache is compared after each step of two generations of one session (the second with
other labels, so an entry left over from the first is wrong), and the tokens of four images (528) must equal
ONNX Runtime's, eagerly and replayed from the CUDA graph.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tests.fakes import installed
from tests.test_trt_on_fakes import GREEDY, SAMPLED, generate

LABELS = [[1, 7], [4, 0]]  # two generations of one batch-2 session


@pytest.fixture(scope="module")
def models():
    from imagefolder.configs import tiny
    from tests.models import cache_sensitive

    return tiny(), *cache_sensitive(tiny())


@pytest.fixture(scope="module")
def bundle(models, tmp_path_factory):
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines

    config, tokenizer, generator = models
    root = export_bundle(tmp_path_factory.mktemp("cache") / "b", tokenizer, generator, config, progress=False)
    with installed() as gpu:
        build_engines(root, batches=[2, 4], progress=False, tf32=False)
        assert not gpu.trt_errors()
    return root


def caches_after_each_step(session, scales, labels, read_cache) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Run one greedy generation of ``labels`` on ``session``; (keys, values, filled positions) after each step."""
    from imagefolder.core.schedule import SamplingParams
    from imagefolder.runtime.loop import ImageRequest, batch_request

    snapshots = []

    @contextlib.contextmanager
    def stage(name, scale=None):
        yield
        if name == "step":
            keys, values = read_cache()
            snapshots.append((keys, values, sum(s * s for s in scales[: scale + 1])))

    params = SamplingParams(**GREEDY)
    images = [ImageRequest(label, params, index) for index, label in enumerate(labels)]
    session.generate(batch_request(images, scales), stage)
    return snapshots


def test_the_cache_after_each_scale_is_the_torch_models(models, bundle):
    from imagefolder.core.sampler import default_candidates
    from imagefolder.runtime.backends.torch_backend import TorchBackend
    from imagefolder.runtime.backends.trt import TrtBackend

    config, tokenizer, generator = models
    reference = TorchBackend(tokenizer, generator, default_candidates(config.generator.codebook_size))
    torch_session, scales = reference.session(2), config.generator.scales

    def torch_cache():
        return torch_session.cache.keys.numpy().copy(), torch_session.cache.values.numpy().copy()

    with installed() as gpu, TrtBackend(bundle, use_cuda_graphs=False) as backend:
        session = backend.session(2)
        depth, (rows, row_bytes, head_dim) = len(session.cache_names[0]), session.cache_rows
        layer_bytes = rows * row_bytes

        def trt_cache():
            out = []
            for buffer in (session.cache_keys, session.cache_values):
                raw = buffer.download(backend.stream)
                layers = [raw[i * session.cache_stride :][:layer_bytes].view(np.float32) for i in range(depth)]
                out.append(np.stack(layers).reshape(depth, 4, config.generator.heads, -1, head_dim))
            return out

        for generation, labels in enumerate(LABELS):
            got = caches_after_each_step(session, scales, labels, trt_cache)
            want = caches_after_each_step(torch_session, scales, labels, torch_cache)
            assert len(got) == len(want) == len(config.generator.scales)
            for (keys, values, filled), (ref_keys, ref_values, _) in zip(got, want, strict=True):
                for name, actual, expected in (("keys", keys, ref_keys), ("values", values, ref_values)):
                    scale = float(np.abs(expected[..., :filled, :]).max())
                    error = np.abs(actual[..., :filled, :] - expected[..., :filled, :]).max() / scale
                    assert error < 1e-4, f"generation {generation}, {filled} positions: {name} off by {error:.2e}"
                    if generation == 0:  # nothing written beyond the fill yet: the zeros the session started with
                        assert not actual[..., filled:, :].any(), f"{name} written beyond position {filled}"
        assert not gpu.trt_errors() and not gpu.cuda.faults


def test_tokens_of_a_cache_sensitive_model_are_onnx_runtimes(bundle):
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.backends.trt import TrtBackend

    labels = [1, 7, 0, 9]
    ort = OrtBackend(bundle)
    runs = [(GREEDY, labels), (SAMPLED, labels), (GREEDY, labels[::-1])]  # eager, captured, replayed
    with installed() as gpu, TrtBackend(bundle) as backend:
        session = backend.session(4)
        for params, request in runs:
            np.testing.assert_array_equal(
                generate(backend, request, session=session, **params).indices,
                generate(ort, request, **params).indices,
            )
        assert session.graph is not None
        assert not gpu.trt_errors() and not gpu.cuda.faults
