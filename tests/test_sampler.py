"""Sampler tests: the numpy reference, the torch module and its ONNX export (run by ONNX Runtime) give
the same tokens; the tokens follow the official top-k/top-p distribution (chi-square); a rank swap of
two near-equal logits changes nothing; the graph uses none of the operators TensorRT 10.3 lacks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scipy import stats

from imagefolder.core.sampler import U_MAX, image_uniforms, sample_tokens
from imagefolder.core.schedule import guidance
from imagefolder.generate import filter_top_k_top_p
from imagefolder.models.sampler import BlockedCumsum, SamplerGraph

NAMES = ("logits", "guidance", "top_k", "top_p", "uniforms", "reference_tokens", "force_mask")
V = 48
FORBIDDEN = {"CumSum", "Loop", "Sort", "Multinomial", "If", "RandomUniform", "RandomUniformLike", "Scan"}


def _export(tmp: Path, candidates: int) -> ort.InferenceSession:
    path = tmp / f"sampler_{candidates}.onnx"
    module = SamplerGraph(candidates, V).eval()
    example = _inputs(np.random.default_rng(0), batch=2, q=3, top_k=5, top_p=0.9, t=1.5)
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
            dynamic_axes={
                "logits": {0: "N", 1: "q"},
                "guidance": {0: "B"},
                "top_k": {0: "B"},
                "top_p": {0: "B"},
                "uniforms": {0: "B", 1: "q"},
                "reference_tokens": {0: "B", 1: "q"},
                "force_mask": {0: "B", 1: "q"},
                "tokens": {0: "B", 1: "q"},
            },
        )
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & FORBIDDEN, ops
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[int, ort.InferenceSession]:
    tmp = tmp_path_factory.mktemp("sampler")
    return {kc: _export(tmp, kc) for kc in (16, V)}


def _inputs(rng, batch, q, top_k, top_p, t, logits=None, forced=0.0) -> dict[str, np.ndarray]:
    """Inputs with one setting for every image (scalars) or one per image (sequences); a fraction ``forced``
    of the tokens teacher-forced to random reference tokens."""
    if logits is None:
        logits = (rng.standard_normal((2 * batch, q, 2 * V)) * 2).astype(np.float32)
    return {
        "logits": logits,
        "guidance": np.broadcast_to(np.asarray(t, np.float32), (batch,)).copy(),
        "top_k": np.broadcast_to(np.asarray(top_k, np.int64), (batch,)).copy(),
        "top_p": np.broadcast_to(np.asarray(top_p, np.float32), (batch,)).copy(),
        "uniforms": rng.random((batch, q, 2), dtype=np.float32),
        "reference_tokens": rng.integers(0, V, (batch, q, 2)).astype(np.int32),
        "force_mask": rng.random((batch, q, 2)) < forced,
    }


def _reference(feeds: dict[str, np.ndarray], candidates: int) -> np.ndarray:
    """The numpy reference on the graph's inputs."""
    return sample_tokens(
        *(feeds[n] for n in NAMES[:5]), candidates, reference=feeds["reference_tokens"], force=feeds["force_mask"]
    )


def _all_three(session, feeds, candidates, with_torch=True) -> np.ndarray:
    ref = _reference(feeds, candidates)
    got = session.run(None, feeds)[0]
    assert got.dtype == np.int32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    if with_torch:
        with torch.no_grad():
            eager = SamplerGraph(candidates, V)(*(torch.from_numpy(feeds[n]) for n in NAMES)).numpy()
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
    ((3, 40, 1), (0.5, 1.0, 0.9), (0.0, 2.0, 4.0)),  # a different setting per image
]


@pytest.mark.parametrize("candidates", [16, V])
@pytest.mark.parametrize("top_k, top_p, t", CASES)
def test_numpy_torch_onnx_agree(graphs, candidates, top_k, top_p, t):
    rng = np.random.default_rng(hash((candidates, str(top_k), str(top_p), str(t))) % 2**32)
    sizes = ((3, 1), (3, 4), (3, 9)) if isinstance(top_k, tuple) else ((1, 1), (2, 4), (3, 9))
    for batch, q in sizes:  # dynamic B and q through the same graph
        _all_three(graphs[candidates], _inputs(rng, batch, q, top_k, top_p, t, forced=0.3), candidates)


@pytest.mark.parametrize("candidates", [16, V])
def test_ties_agree_between_numpy_and_onnx(graphs, candidates):
    """Integer logits tie often; the reference breaks ties like ONNX TopK (lower index first)."""
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 3, (4, 5, 2 * V)).astype(np.float32)
    for top_k, top_p in ((1, 1.0), (7, 1.0), (20, 0.6)):
        feeds = _inputs(rng, 2, 5, top_k, top_p, 0.0, logits=logits)
        # torch's eager topk leaves the order of equal values unspecified, so only ONNX vs numpy here.
        tokens = _all_three(graphs[candidates], feeds, candidates, with_torch=False)
        if top_k == 1:  # the first maximum of each branch's row
            np.testing.assert_array_equal(tokens, logits[:2].reshape(2, 5, 2, V).argmax(-1))


def test_greedy_cases_pick_the_cfg_argmax():
    rng = np.random.default_rng(2)
    feeds = _inputs(rng, 3, 4, 1, 0.95, 2.5)
    mixed = 3.5 * feeds["logits"][:3] - 2.5 * feeds["logits"][3:]
    expected = mixed.reshape(3, 4, 2, V).argmax(-1)
    np.testing.assert_array_equal(_reference(feeds, 16), expected)
    feeds["top_k"][:] = 750
    feeds["top_p"][:] = 1e-6  # only rank 0 has mass before it below top_p
    np.testing.assert_array_equal(_reference(feeds, 16), expected)
    feeds["uniforms"][:] = U_MAX  # the largest uniform still lands on the one kept token
    np.testing.assert_array_equal(_reference(feeds, 16), expected)


def test_guidance_zero_ignores_unconditional_rows():
    rng = np.random.default_rng(3)
    feeds = _inputs(rng, 2, 3, 750, 0.95, 0.0)
    before = _reference(feeds, 16)
    feeds["logits"][2:] = rng.standard_normal(feeds["logits"][2:].shape).astype(np.float32) * 10
    np.testing.assert_array_equal(_reference(feeds, 16), before)


@pytest.mark.parametrize("candidates", [16, V])
def test_forced_tokens_are_the_reference_and_the_rest_are_the_draw(graphs, candidates):
    """Where the mask is set the token is the reference's; elsewhere it is what the unforced draw gives; an empty
    mask gives the unconditioned tokens; numpy, torch and ONNX agree on all of it."""
    rng = np.random.default_rng(11)
    feeds = _inputs(rng, 3, 9, 20, 0.9, 2.0, forced=0.4)
    forced = _all_three(graphs[candidates], feeds, candidates)
    free = _all_three(graphs[candidates], {**feeds, "force_mask": np.zeros_like(feeds["force_mask"])}, candidates)
    mask = feeds["force_mask"]
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(forced[mask], feeds["reference_tokens"][mask])
    np.testing.assert_array_equal(forced[~mask], free[~mask])
    assert (free[mask] != feeds["reference_tokens"][mask]).any()  # the forcing changed something
    unconditioned = sample_tokens(*(feeds[n] for n in NAMES[:5]), candidates)
    np.testing.assert_array_equal(free, unconditioned)
    everything = {**feeds, "force_mask": np.ones_like(mask)}
    np.testing.assert_array_equal(_all_three(graphs[candidates], everything, candidates), feeds["reference_tokens"])


def test_the_selection_is_a_where_in_the_graph(tmp_path):
    """The last node picks between reference and draw: a Where on the bool mask input, no If."""
    _export(tmp_path, 16)
    model = onnx.load(str(tmp_path / "sampler_16.onnx"))
    inputs = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    assert inputs["force_mask"] == onnx.TensorProto.BOOL and inputs["reference_tokens"] == onnx.TensorProto.INT32
    last = next(node for node in model.graph.node if "tokens" in node.output)
    assert last.op_type == "Where" and "force_mask" in last.input


def _official_probabilities(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The official distribution of one row: top-k, then top-p, then softmax of what is kept."""
    filtered = filter_top_k_top_p(torch.from_numpy(logits[None].astype(np.float64)), top_k, top_p)
    return torch.softmax(filtered, dim=-1)[0].numpy()


@pytest.mark.parametrize(
    "top_k, top_p", [(1, 1.0), (5, 1.0), (V, 1.0), (V, 0.9), (20, 0.5), (V, 1e-6), (12, 0.97), (2, 0.999)]
)
def test_draws_follow_the_official_distribution(top_k, top_p):
    """100 000 draws on one row of logits: a chi-square test against the official filtered softmax."""
    rng = np.random.default_rng(7)
    row = (rng.standard_normal(V) * 1.5).astype(np.float32)
    expected = _official_probabilities(row, top_k, top_p)
    draws = 100_000
    logits = np.zeros((2 * draws, 1, 2 * V), np.float32)
    logits[:, 0, :V] = logits[:, 0, V:] = row  # both branches, both CFG halves (guidance 0)
    tokens = sample_tokens(logits, 0.0, top_k, top_p, rng.random((draws, 1, 2), dtype=np.float32), V)
    counts = np.bincount(tokens.reshape(-1), minlength=V)
    support = expected > 0
    assert counts[~support].sum() == 0, "a token the official filter drops was drawn"
    if support.sum() == 1:
        assert counts[support].sum() == tokens.size
        return
    chi2, p_value = stats.chisquare(counts[support], expected[support] * tokens.size)
    assert p_value > 1e-3, (chi2, p_value, support.sum())


def test_a_rank_swap_of_near_equal_logits_changes_nothing():
    """Two logits one ulp apart, in both orders: the same uniform draws the same token."""
    rng = np.random.default_rng(8)
    base = (rng.standard_normal(V) * 0.3).astype(np.float32)
    a, b = 3, 17
    base[a] = base[b] = np.float32(2.0)  # the two most likely tokens
    upper = np.nextafter(np.float32(2.0), np.float32(3.0))
    first, second = base.copy(), base.copy()
    first[a], second[b] = upper, upper  # a ranks before b in one, after it in the other
    uniforms = rng.random((2000, 1, 2), dtype=np.float32)
    results = []
    for row in (first, second):
        logits = np.zeros((4000, 1, 2 * V), np.float32)
        logits[:, 0, :V] = logits[:, 0, V:] = row
        results.append(sample_tokens(logits, 0.0, 20, 0.9, uniforms, V))
    np.testing.assert_array_equal(results[0], results[1])
    assert {a, b} <= set(np.unique(results[0]))  # both were drawn: the test exercises the swap


def test_blocked_cumsum_equals_cumsum():
    for length in (1, 7, 16, 48, 1024, 1000):
        x = torch.rand(3, 5, length, dtype=torch.float64)
        module = BlockedCumsum(length).double()
        torch.testing.assert_close(module(x), x.cumsum(-1))


def test_image_uniforms_depend_on_seed_and_index_only():
    a = image_uniforms(5, 2, 66, 2)
    assert a.shape == (66, 2) and a.dtype == np.float32 and a.min() >= 0 and a.max() < 1
    np.testing.assert_array_equal(a, image_uniforms(5, 2, 66, 2))
    assert not np.array_equal(a, image_uniforms(5, 3, 66, 2)) and not np.array_equal(a, image_uniforms(6, 2, 66, 2))


def test_rejects_bad_shapes():
    rng = np.random.default_rng(5)
    feeds = _inputs(rng, 2, 3, 5, 0.9, 1.0)
    feeds["uniforms"] = rng.random((2, 3, 2, V), dtype=np.float32)  # one per vocabulary entry: schema 2
    with pytest.raises(ValueError, match="sampler shapes"):
        _reference(feeds, 16)
    with pytest.raises(ValueError, match="sampler shapes"):
        _reference(_inputs(rng, 2, 3, 5, 0.9, 1.0), V + 1)
    with pytest.raises(ValueError, match="candidates"):
        SamplerGraph(0, V)


def test_guidance_schedule():
    assert guidance(3.25, 0, 10) == 0.0
    assert guidance(3.25, 9, 10) == pytest.approx(3.25)
    assert guidance(1.8, 3, 10) == pytest.approx(0.6)
    assert guidance(2.0, 0, 1) == 2.0
