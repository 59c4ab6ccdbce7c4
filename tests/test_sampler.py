"""Sampler tests: the numpy reference, the torch module and its ONNX export (run by ONNX Runtime) give
the same tokens, and the tokens follow the documented top-k/top-p/Gumbel-max semantics."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from imagefolder.core.sampler import sample_tokens
from imagefolder.core.schedule import guidance
from imagefolder.models.sampler import SamplerGraph

NAMES = ("logits", "guidance", "top_k", "top_p", "noise")
V = 48


def _export(tmp: Path, candidates: int) -> ort.InferenceSession:
    path = tmp / f"sampler_{candidates}.onnx"
    module = SamplerGraph(candidates).eval()
    example = _inputs(np.random.default_rng(0), batch=2, q=3, candidates=candidates, top_k=5, top_p=0.9, t=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; its graph is what we want
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(example[n]) for n in NAMES),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(NAMES),
            output_names=["tokens"],
            dynamic_axes={"logits": {0: "N", 1: "q"}, "noise": {0: "B", 1: "q"}, "tokens": {0: "B", 1: "q"}},
        )
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Multinomial", "Sort", "If", "Loop", "RandomUniform", "RandomUniformLike"}, ops
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[int, ort.InferenceSession]:
    tmp = tmp_path_factory.mktemp("sampler")
    return {kc: _export(tmp, kc) for kc in (16, V)}


def _inputs(rng, batch, q, candidates, top_k, top_p, t, logits=None) -> dict[str, np.ndarray]:
    if logits is None:
        logits = (rng.standard_normal((2 * batch, q, 2 * V)) * 2).astype(np.float32)
    return {
        "logits": logits,
        "guidance": np.array([t], np.float32),
        "top_k": np.array([top_k], np.int64),
        "top_p": np.array([top_p], np.float32),
        "noise": rng.random((batch, q, 2, V), dtype=np.float32),
    }


def _all_three(session, feeds, candidates, with_torch=True) -> np.ndarray:
    ref = sample_tokens(*(feeds[n] for n in NAMES), candidates)
    got = session.run(None, feeds)[0]
    assert got.dtype == np.int32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    if with_torch:
        with torch.no_grad():
            eager = SamplerGraph(candidates)(*(torch.from_numpy(feeds[n]) for n in NAMES)).numpy()
        np.testing.assert_array_equal(eager, ref)
    return ref


CASES = [  # top_k, top_p, guidance
    (750, 0.95, 2.0),
    (5, 0.9, 1.5),
    (1, 0.95, 3.25),
    (750, 1.0, 3.25),
    (750, 1e-6, 1.0),
    (10, 1.0, 0.0),
    (0, 0.5, 0.7),  # top_k below 1 behaves as 1
]


@pytest.mark.parametrize("candidates", [16, V])
@pytest.mark.parametrize("top_k, top_p, t", CASES)
def test_numpy_torch_onnx_agree(graphs, candidates, top_k, top_p, t):
    rng = np.random.default_rng(hash((candidates, top_k, top_p, t)) % 2**32)
    for batch, q in ((1, 1), (2, 4), (3, 9)):  # dynamic B and q through the same graph
        feeds = _inputs(rng, batch, q, candidates, top_k, top_p, t)
        _all_three(graphs[candidates], feeds, candidates)


@pytest.mark.parametrize("candidates", [16, V])
def test_ties_go_to_lower_index(graphs, candidates):
    """Integer logits tie often; the reference breaks ties like ONNX TopK (lower index first)."""
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 3, (4, 5, 2 * V)).astype(np.float32)
    for top_k, top_p in ((1, 1.0), (7, 1.0), (20, 0.6)):
        feeds = _inputs(rng, 2, 5, candidates, top_k, top_p, 0.0, logits=logits)
        # torch's eager topk leaves the order of equal values unspecified, so only ONNX vs numpy here.
        tokens = _all_three(graphs[candidates], feeds, candidates, with_torch=False)
        if top_k == 1:  # the first maximum of each branch's row
            first = logits[:2].reshape(2, 5, 2, V).argmax(-1)
            np.testing.assert_array_equal(tokens, first)


def test_greedy_cases_pick_the_cfg_argmax():
    rng = np.random.default_rng(2)
    feeds = _inputs(rng, 3, 4, 16, 1, 0.95, 2.5)
    mixed = 3.5 * feeds["logits"][:3] - 2.5 * feeds["logits"][3:]
    expected = mixed.reshape(3, 4, 2, V).argmax(-1)
    np.testing.assert_array_equal(sample_tokens(*(feeds[n] for n in NAMES), 16), expected)
    feeds["top_k"][:] = 750
    feeds["top_p"][:] = 1e-6  # only rank 0 has mass before it below top_p
    np.testing.assert_array_equal(sample_tokens(*(feeds[n] for n in NAMES), 16), expected)


def test_guidance_zero_ignores_unconditional_rows():
    rng = np.random.default_rng(3)
    feeds = _inputs(rng, 2, 3, 16, 750, 0.95, 0.0)
    before = sample_tokens(*(feeds[n] for n in NAMES), 16)
    feeds["logits"][2:] = rng.standard_normal(feeds["logits"][2:].shape).astype(np.float32) * 10
    np.testing.assert_array_equal(sample_tokens(*(feeds[n] for n in NAMES), 16), before)


def test_frequencies_follow_the_filtered_distribution():
    """Many draws on one row: top-k/top-p drop the right tokens, the rest follow the softmax."""
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = np.zeros((2, 1, 2 * V), np.float32) - 30.0
    logits[0, 0, : len(probs)] = np.log(probs)
    logits[0, 0, V : V + len(probs)] = np.log(probs)
    rng = np.random.default_rng(4)
    draws = 20000
    noise = rng.random((draws, 1, 2, V), dtype=np.float32)
    tiled = np.concatenate([np.repeat(logits[:1], draws, 0), np.repeat(logits[1:], draws, 0)])
    # top_k=5 drops token 5; top_p=0.75 keeps ranks whose preceding mass < 0.75: tokens 0, 1, 2.
    tokens = sample_tokens(tiled, 0.0, 5, 0.75, noise, 8)
    assert set(np.unique(tokens)) == {0, 1, 2}
    expected = probs[:3] / probs[:3].sum()
    freq = np.bincount(tokens.reshape(-1), minlength=3) / tokens.size
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_rejects_bad_shapes():
    rng = np.random.default_rng(5)
    feeds = _inputs(rng, 2, 3, 16, 5, 0.9, 1.0)
    feeds["noise"] = feeds["noise"][..., :16]  # one value per candidate instead of per vocabulary entry
    with pytest.raises(ValueError, match="sampler shapes"):
        sample_tokens(*(feeds[n] for n in NAMES), 16)
    with pytest.raises(ValueError, match="sampler shapes"):
        sample_tokens(*(_inputs(rng, 2, 3, 16, 5, 0.9, 1.0)[n] for n in NAMES), V + 1)
    with pytest.raises(ValueError, match="candidates"):
        SamplerGraph(0)


def test_guidance_schedule():
    assert guidance(3.25, 0, 10) == 0.0
    assert guidance(3.25, 9, 10) == pytest.approx(3.25)
    assert guidance(1.8, 3, 10) == pytest.approx(0.6)
    assert guidance(2.0, 0, 1) == 2.0
