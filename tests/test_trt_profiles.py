"""Optimization-profile plan of the TensorRT build: counts, order and shapes, for the tiny and official models."""

from __future__ import annotations

import pytest

from imagefolder.configs import official, tiny
from imagefolder.core.schedule import scale_spans
from imagefolder.core.specs import cache_input_names
from imagefolder.export.trt_build import plan_profiles
from tests.trt_helpers import make_manifest

# (config, scales) → expected profiles per graph for batches [1, 8]
CASES = {
    "tiny": (tiny(), (1, 2, 3, 4, 6)),
    "official": (official(), (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_profile_counts(case):
    cfg, scales = CASES[case]
    sn = len(scales)
    plan = plan_profiles(make_manifest(cfg), [1, 8])
    counts = {graph: len(profiles) for graph, profiles in plan.items()}
    assert counts == {
        "encoder": 2,
        "decoder": 2,
        "ar_prefill": 2,
        "ar_step": 2 * sn,  # scale 0 included: the prefill no longer runs the trunk
        "sampler": 2 * sn,
        "fold": 2 * (sn - 1),  # the last scale has no next input to make
    }
    assert sum(counts.values()) == (6 + 4 * sn + 2 * (sn - 1))  # tiny: 34, official: 64


@pytest.mark.parametrize("case", sorted(CASES))
def test_profile_shapes(case):
    cfg, scales = CASES[case]
    gen, tok = cfg.generator, cfg.tokenizer
    spans = scale_spans(scales)
    P, L, H, D = sum(p * p for p in scales), gen.depth, gen.heads, gen.width // gen.heads
    plan = plan_profiles(make_manifest(cfg, candidates=64), [8, 1])  # order of the request does not matter

    steps = plan["ar_step"]
    assert [(p.batch, p.scale_index) for p in steps] == [(b, si) for b in (1, 8) for si in range(len(scales))]
    for p in steps:
        q, n = spans[p.scale_index][1], 2 * p.batch
        assert p.graph == "ar_step"
        assert p.shapes == {
            "x_folded": (n, q, 2 * gen.code_dim),
            "positions": (q,),
            "cond_start": (n, 1, gen.width),
            "cond_blocks": (n, L, 6, gen.width),
            "cond_head": (n, 2, gen.width),
            **{name: (n, H, P, D) for names in cache_input_names(L) for name in names},
        }
    for p in plan["sampler"]:
        q = spans[p.scale_index][1]
        assert p.shapes["logits"] == (2 * p.batch, q, 2 * gen.codebook_size)
        assert p.shapes["uniforms"] == (p.batch, q, 2)  # one uniform per token
        assert p.shapes["guidance"] == p.shapes["top_k"] == p.shapes["top_p"] == (p.batch,)  # per image
    for p in plan["fold"]:
        nxt = spans[p.scale_index + 1][1]
        assert p.shapes["tokens"] == (p.batch, spans[p.scale_index][1], 2)
        assert p.shapes["next_positions"] == (nxt,)
        assert p.shapes["f_hat"] == (p.batch, 2 * gen.code_dim, scales[-1], scales[-1])
    for graph in ("encoder", "decoder", "ar_prefill"):
        assert [(p.batch, p.scale_index) for p in plan[graph]] == [(1, None), (8, None)]
    assert plan["encoder"][1].shapes == {"image": (8, 3, tok.image_size, tok.image_size)}
    assert plan["decoder"][0].shapes == {"indices": (1, 2, P)}
    assert plan["ar_prefill"][1].shapes == {"labels": (16,)}


def test_profile_serialises():
    profile = plan_profiles(make_manifest(tiny()), [1])["fold"][3]
    assert profile.to_dict() == {
        "batch": 1,
        "scale_index": 3,
        "shapes": {"tokens": [1, 16, 2], "f_hat": [1, 32, 6, 6], "scale_index": [1], "next_positions": [36]},
    }


@pytest.mark.parametrize("batches", [[], [0], [9]])
def test_bad_batches(batches):
    with pytest.raises(ValueError):
        plan_profiles(make_manifest(tiny(), batch_max=8), batches)
