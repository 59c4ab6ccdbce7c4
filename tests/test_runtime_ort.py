"""ONNX Runtime backend and generation loop on a bundle of small stand-in graphs.

The stand-ins have the tiny model's exact I/O and depend on every input that matters (the labels and
null rows, the cache before the scale's first position, the folded input, f̂, the scale index), so a
mistake in the backend's buffers, bindings, cache writes or call order changes the tokens. A plain
reference loop (``InferenceSession.run`` with fresh arrays, the numpy sampler) must give the same
indices. The real model's end-to-end test lives with the export.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from imagefolder.configs import tiny
from imagefolder.core.bundle import load_bundle
from imagefolder.core.images import save_grid, save_png, to_uint8
from imagefolder.core.sampler import image_uniforms, sample_tokens
from imagefolder.core.schedule import SamplingParams, guidance, scale_spans
from imagefolder.core.specs import cache_input_names, graph_specs
from imagefolder.errors import InputError
from imagefolder.models.sampler import SamplerGraph
from imagefolder.runtime.backends.ort import OrtBackend, OrtBackendError
from imagefolder.runtime.loop import ImageRequest, batch_request, generate, session_sizes
from imagefolder.runtime.profiler import StepProfiler, profile_generation
from tests.test_runtime_bundle import CANDIDATES, make_bundle

CFG = tiny()
L, H, C = CFG.generator.depth, CFG.generator.heads, CFG.generator.width
D, V2, Z2 = C // H, 2 * CFG.generator.codebook_size, 2 * CFG.generator.code_dim
P, K, IMG = CFG.generator.positions, CFG.generator.scales[-1], CFG.tokenizer.image_size


class Prefill(nn.Module):
    def forward(self, labels):
        x = labels.float()  # (N,)
        cond_start = torch.sin(x[:, None, None] * 0.37) + torch.zeros(1, 1, C)
        cond_blocks = x.reshape(-1, 1, 1, 1) + torch.zeros(1, L, 6, C)
        return cond_start, cond_blocks, x.reshape(-1, 1, 1) + torch.zeros(1, 2, C)


class Step(nn.Module):
    def forward(self, x_folded, positions, cond_start, cond_blocks, cond_head, *cache):
        past_keys, past_values = torch.stack(cache[:L]), torch.stack(cache[L:])  # (L, N, H, P, D) each
        valid = (torch.arange(P) < positions[:1]).float()  # only entries before this scale count
        # Each layer weighs differently, so a runtime that binds layers out of order changes the result.
        layer_weight = torch.arange(1, L + 1).float().reshape(L, 1, 1, 1, 1)
        past = ((past_keys - 0.5 * past_values) * layer_weight * valid[:, None]).sum((0, 2, 3, 4))  # (N,)
        cond = cond_blocks.mean((1, 2, 3)) + cond_head.mean((1, 2))  # (N,)
        first = positions[:1] == 0  # scale 0 reads the start token, not the folded input
        x = torch.where(first, cond_start.mean(-1, keepdim=True), x_folded.mean(-1, keepdim=True))  # (N, q, 1)
        base = x + (past + cond)[:, None, None] * 0.01  # (N, q, 1)
        logits = torch.sin(base * torch.arange(V2) * 0.21 + positions[None, :, None].float())  # (N, q, 2V)
        kv = base.squeeze(-1)[None, :, None, :, None] + torch.zeros(L, 1, H, 1, D)  # (L, N, H, q, D)
        return logits, kv, kv * 2


class Fold(nn.Module):
    def forward(self, tokens, f_hat, scale_index, next_positions):
        add = tokens.float().mean((1, 2)).reshape(-1, 1, 1, 1) * (scale_index.float() + 1) / 100  # (B, 1, 1, 1)
        f_hat_out = f_hat * 0.5 + add  # (B, 2Z, K, K)
        pooled = f_hat_out.mean((2, 3))  # (B, 2Z)
        x = torch.cat([pooled, -pooled])[:, None, :] + next_positions[None, :, None].float() * 0.001  # (N, q_next, 2Z)
        return f_hat_out, x


class Encoder(nn.Module):
    def forward(self, image):
        level = ((image.mean((1, 2, 3)) + 1) * 100).to(torch.int32)  # (B,)
        return level[:, None, None] + torch.zeros(1, 2, P, dtype=torch.int32)


class Decoder(nn.Module):
    def forward(self, indices):
        level = indices.float().mean((1, 2)) / V2 * 2 - 1  # (B,)
        return level.reshape(-1, 1, 1, 1) + torch.zeros(1, 3, IMG, IMG)


def _export(module: nn.Module, spec, example: tuple, path) -> bytes:
    dynamic = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs + spec.outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes={k: v for k, v in dynamic.items() if v},
        )
    return path.read_bytes()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ort")
    specs = graph_specs(CFG.to_dict())
    q, qn, B, N = 4, 9, 2, 4
    examples = {
        "ar_prefill": (Prefill(), (torch.tensor([1, 2, 10, 10]),)),
        "ar_step": (
            Step(),
            (
                torch.rand(N, q, Z2),
                torch.arange(1, 1 + q),
                torch.rand(N, 1, C),
                torch.rand(N, L, 6, C),
                torch.rand(N, 2, C),
                *torch.rand(2 * L, N, H, P, D),  # keys of every layer, then values
            ),
        ),
        "sampler": (
            SamplerGraph(CANDIDATES, V2 // 2),
            (
                torch.randn(N, q, V2),
                torch.tensor([1.0, 2.0]),
                torch.tensor([5, 7]),
                torch.tensor([0.9, 0.8]),
                torch.rand(B, q, 2),
                torch.randint(0, V2 // 2, (B, q, 2), dtype=torch.int32),
                torch.rand(B, q, 2) < 0.5,
            ),
        ),
        "fold": (
            Fold(),
            (
                torch.randint(0, 256, (B, q, 2), dtype=torch.int32),
                torch.rand(B, Z2, K, K),
                torch.tensor([1]),
                torch.arange(5, 5 + qn),
            ),
        ),
        "encoder": (Encoder(), (torch.rand(B, 3, IMG, IMG),)),
        "decoder": (Decoder(), (torch.randint(0, 256, (B, 2, P), dtype=torch.int32),)),
    }
    files = {name: _export(m, specs[name], ex, tmp / f"{name}.tmp") for name, (m, ex) in examples.items()}
    return make_bundle(tmp / "bundle", files)


def _reference(bundle_dir, labels, params: SamplingParams, reference=None, force=None) -> np.ndarray:
    """The loop with plain ``run`` calls, fresh arrays and the numpy sampler; ``reference`` (B, 2, P) and
    ``force`` (B, P, 2) teacher-force tokens."""
    run = {
        g: ort.InferenceSession(str(bundle_dir / f"{g}.onnx"), providers=["CPUExecutionProvider"]).run
        for g in ("ar_prefill", "ar_step", "fold")
    }
    spans, B = scale_spans(CFG.generator.scales), len(labels)
    rows = np.concatenate([labels, np.full(B, CFG.generator.num_classes)]).astype(np.int64)
    cond_start, cond_blocks, cond_head = run["ar_prefill"](None, {"labels": rows})
    cache_k, cache_v = np.zeros((L, 2 * B, H, P, D), np.float32), np.zeros((L, 2 * B, H, P, D), np.float32)
    key_names, value_names = cache_input_names(L)
    f_hat, indices = np.zeros((B, Z2, K, K), np.float32), np.zeros((B, 2, P), np.int32)
    uniforms = np.stack([image_uniforms(params.seed, i, P, 2) for i in range(B)])
    reference = np.zeros((B, 2, P), np.int32) if reference is None else reference
    force = np.zeros((B, P, 2), bool) if force is None else force
    x = np.zeros((2 * B, 1, Z2), np.float32)
    for si, (start, q) in enumerate(spans):
        positions = np.arange(start, start + q)
        feeds = {
            "x_folded": x,
            "positions": positions,
            "cond_start": cond_start,
            "cond_blocks": cond_blocks,
            "cond_head": cond_head,
            **dict(zip(key_names, cache_k, strict=True)),
            **dict(zip(value_names, cache_v, strict=True)),
        }
        logits, keys, values = run["ar_step"](None, feeds)
        cache_k[:, :, :, positions], cache_v[:, :, :, positions] = keys, values
        t = guidance(params.cfg, si, len(spans))
        scale = slice(start, start + q)
        tokens = sample_tokens(
            logits,
            t,
            params.top_k,
            params.top_p,
            uniforms[:, scale],
            CANDIDATES,
            reference=reference[:, :, scale].transpose(0, 2, 1),
            force=force[:, scale],
        )
        indices[:, :, start : start + q] = tokens.transpose(0, 2, 1)
        if si + 1 < len(spans):
            nxt = spans[si + 1]
            f_hat, x = run["fold"](
                None,
                {
                    "tokens": tokens,
                    "f_hat": f_hat,
                    "scale_index": np.array([si]),
                    "next_positions": np.arange(nxt[0], nxt[0] + nxt[1]),
                },
            )
    return indices


def test_generate_matches_the_reference_loop(bundle_dir):
    backend = OrtBackend(load_bundle(bundle_dir), threads=1)
    params = SamplingParams(cfg=2.0, top_k=8, top_p=0.9, seed=3)
    labels = np.array([3, 7])
    result = generate(backend, labels, params)
    assert result.images.shape == (2, 3, IMG, IMG) and result.images.dtype == np.float32
    assert result.indices.shape == (2, 2, P) and result.indices.dtype == np.int32
    np.testing.assert_array_equal(result.indices, _reference(bundle_dir, labels, params))
    np.testing.assert_allclose(result.images, backend.decode(result.indices))

    # A reused session (profiling) gives the same result; a new seed gives another one.
    prof = StepProfiler(warmup=1)
    with backend.session(2) as session:
        for _ in range(3):
            again = generate(backend, labels, params, profiler=prof, session=session)
            np.testing.assert_array_equal(again.indices, result.indices)
    report = prof.report()
    assert report["runs"] == 2 and len(report["stages"]) == 1 + 2 * 5 + 4 + 1  # prefill, step+sample ×5, fold ×4
    # uniforms, label, cfg, k, p, reference tokens, force mask
    assert report["bytes_to_device_per_image"] == 66 * 2 * 4 + 8 + 5 * 4 + 8 + 4 + 66 * 2 * 4 + 66 * 2
    other = generate(backend, labels, SamplingParams(cfg=2.0, top_k=8, top_p=0.9, seed=4))
    assert not np.array_equal(other.indices, result.indices)
    for batch in (1, 3):  # every batch size up to batch_max through the same graphs
        labels = np.arange(batch)
        np.testing.assert_array_equal(generate(backend, labels, params).indices, _reference(bundle_dir, labels, params))


def test_conditioned_generation_matches_the_reference_loop(bundle_dir):
    """Mixed conditioned and unconditioned images in one batch: each equals the plain loop with its own reference
    and mask, forced tokens hold the reference, and the unconditioned image is what it is alone."""
    backend = OrtBackend(load_bundle(bundle_dir), threads=1)
    params = SamplingParams(cfg=2.0, top_k=8, top_p=0.9, seed=3)
    labels = np.array([3, 7, 1])
    rng = np.random.default_rng(0)
    reference = rng.integers(0, V2 // 2, (3, 2, P)).astype(np.int32)
    force = rng.random((3, P, 2)) < 0.5
    force[1] = False  # image 1 is unconditioned
    result = generate(backend, labels, params, reference=reference, force=force)
    np.testing.assert_array_equal(result.indices, _reference(bundle_dir, labels, params, reference, force))
    forced = force.transpose(0, 2, 1)
    np.testing.assert_array_equal(result.indices[forced], reference[forced])
    plain = generate(backend, labels, params).indices
    np.testing.assert_array_equal(result.indices[1], plain[1])
    assert not np.array_equal(result.indices[0], plain[0])
    with pytest.raises(InputError, match="range from"):
        generate(backend, labels, params, reference=reference + V2, force=force)
    with pytest.raises(InputError, match="force mask"):
        generate(backend, labels, params, reference=reference)
    with pytest.raises(InputError, match="2 reference indices for 3 images"):
        generate(backend, labels, params, reference=reference[:2], force=force)


def test_errors_are_clear(bundle_dir):
    backend = OrtBackend(bundle_dir)
    with pytest.raises(OrtBackendError, match=r"batch 5 is outside \[1, 4\]"):
        backend.session(5)
    with pytest.raises(OrtBackendError, match="available: .*CPUExecutionProvider"):
        OrtBackend(bundle_dir, providers=["NoSuchExecutionProvider"])
    with pytest.raises(InputError, match=r"class id\(s\) \[10, -1\] outside \[0, 10\)"):
        generate(backend, [1, 10, -1])
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InputError, match="top_k"):
        SamplingParams(top_k=0)
    with pytest.raises(InputError, match="cfg"):
        SamplingParams(cfg=-1.0)
    request = batch_request(
        [ImageRequest(1, SamplingParams()), ImageRequest(2, SamplingParams(), 1)], CFG.generator.scales
    )
    with (
        backend.session(1) as session,
        pytest.raises(OrtBackendError, match="a request of 2 images for a session of 1"),
    ):
        session.generate(request)


def test_encode_decode_and_images(bundle_dir, tmp_path):
    from PIL import Image

    backend = OrtBackend(bundle_dir)
    images = np.full((2, 3, IMG, IMG), 0.5, np.float32)
    indices = backend.encode(images)
    assert indices.shape == (2, 2, P) and indices.dtype == np.int32 and (indices == 150).all()
    with pytest.raises(OrtBackendError, match="expected"):
        backend.encode(np.zeros((2, 3, 32, 32), np.float32))
    pixels = to_uint8(np.array([-1.0, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 2, 2).repeat(3, 1))
    assert pixels.shape == (1, 2, 2, 3) and pixels[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    out = save_png(tmp_path / "one.png", backend.decode(indices)[:1])
    assert Image.open(out).size == (IMG, IMG)
    grid = save_grid(tmp_path / "sub" / "grid.png", np.zeros((3, 3, IMG, IMG), np.float32), pad=2)
    assert Image.open(grid).size == (2 * IMG + 2, 2 * IMG + 2)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["grid.png", "one.png", "sub"]  # no temp files left


def test_profile_generation(bundle_dir, tmp_path):
    result = profile_generation(OrtBackend(bundle_dir), [1, 2], SamplingParams(), runs=2, warmup=1)
    assert [r["batch"] for r in result.reports] == [1, 2] and all(r["runs"] == 2 for r in result.reports)
    assert "batch 2" in result.table()
    report = json.loads(result.write_json(tmp_path / "p.json").read_text())
    assert report["reports"][0]["time_per_step_ms"]["host"]["n"] == 2
    trace = json.loads(result.write_trace(tmp_path / "p.trace.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"]} == {1, 2}


def test_session_sizes_fill_the_largest_then_pad_the_smallest_that_holds_the_rest():
    assert session_sizes(5, [1, 2]) == [2, 2, 1]
    assert session_sizes(11, [1, 8]) == [8, 8]  # 3 left: one padded launch of 8, not three of 1
    assert session_sizes(3, [2]) == [2, 2]
    assert session_sizes(0, [1, 4]) == [] and session_sizes(4, [4, 1]) == [4]
    with pytest.raises(InputError):
        session_sizes(2, [])
