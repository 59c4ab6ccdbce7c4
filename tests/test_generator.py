"""The generator: official state_dict layout, explicit-cache equivalence, reference generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from imagefolder.configs import PRESETS, official, phi_indices, tiny
from imagefolder.generate import filter_top_k_top_p, generate
from imagefolder.models.generator import Generator, KVCache, block_causal_bias
from imagefolder.models.tokenizer import Tokenizer
from tests.reference import official_keys


def _generator(cfg, seed=0) -> Generator:
    torch.manual_seed(seed)
    gen = Generator(cfg).eval()
    for block in gen.blocks:  # the official init makes AdaLN near-zero; exercise it fully
        torch.nn.init.normal_(block.ada_lin[-1].weight, std=0.02)
    torch.nn.init.normal_(gen.head_nm.ada_lin[-1].weight, std=0.02)
    return gen


@pytest.mark.parametrize("name", ["imagefolder-d17", "imagefolder-d17-8192", "imagefolder-d17-16384"])
def test_official_state_dict_layout(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        gen = Generator(cfg.generator)
    ours = [(k, tuple(v.shape), str(v.dtype)) for k, v in gen.state_dict().items()]
    expected = official_keys("VAR")
    v2 = 2 * cfg.generator.codebook_size
    expected = [(k, (v2, s[1]) if k == "head.weight" else (v2,) if k == "head.bias" else s, d) for k, s, d in expected]
    assert ours == expected


def test_official_parameter_count():
    with torch.device("meta"):
        gen = Generator(official().generator)
    assert sum(p.numel() for p in gen.parameters()) == 375_258_593
    assert sum(p.numel() for p in gen.blocks.parameters()) == pytest.approx(362.5e6, rel=1e-3)


def test_phi_index_and_mask():
    assert phi_indices(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    bias = block_causal_bias((1, 2))[0, 0]
    assert bias.shape == (5, 5)
    assert torch.isinf(bias[0, 1:]).all() and (bias[1:, :] == 0).all()


@pytest.mark.parametrize(
    "cfg",
    [tiny().generator, dataclasses.replace(official().generator, depth=2)],
    ids=["tiny", "official-width-depth2"],
)
def test_cached_steps_equal_teacher_forcing(cfg):
    gen = _generator(cfg)
    labels = torch.tensor([1, 3, cfg.null_class])
    x = torch.randn(3, cfg.positions - 1, cfg.folded_dim)
    with torch.no_grad():
        full = gen(labels, x)
        cond_start, cond_blocks, cond_head = gen.prefill(labels)
        cache = KVCache.allocate(cfg, 3)
        errors = []
        for si in range(len(cfg.scales)):
            start, q = cfg.scale_offsets[si], cfg.scales[si] ** 2
            # Garbage after the fill position must be ignored (at scale 0: the whole cache).
            cache.keys[:, :, :, cache.length :] = 1e3
            folded = x[:, start - 1 : start - 1 + q] if si else torch.randn(3, 1, cfg.folded_dim)  # ignored at 0
            step_logits, keys, values = gen.step(
                folded,
                torch.arange(start, start + q),
                cond_start,
                cond_blocks,
                cond_head,
                cache.keys,
                cache.values,
            )
            cache.append(keys, values)
            errors.append((step_logits - full[:, start : start + q]).abs().max().item())
    assert cache.length == cfg.positions
    assert max(errors) < 1e-4, errors
    assert full.abs().max() > 0.1  # not trivially zero


def test_no_module_holds_a_cache():
    # Habit: the caller owns the cache; no kv_caching toggles or cached tensors as attributes.
    import inspect

    import imagefolder.models.generator as module

    source = inspect.getsource(module)
    assert "kv_caching" not in source and "self.cached_k" not in source


def test_filter_top_k_top_p_official_semantics():
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.0]]])
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [[[True, True, True, False, False]]]
    probs = logits.softmax(-1)[0, 0]
    # top-p removes ascending-sorted tokens whose cumulative mass is <= 1 - p.
    p = float(probs[0] + probs[1]) + 1e-4
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=p))
    assert kept[0, 0].tolist() == [True, True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=1e-6))
    assert kept[0, 0].tolist() == [True, False, False, False, False]


@pytest.fixture(scope="module")
def tiny_models():
    cfg = tiny()
    torch.manual_seed(1)
    return Tokenizer(cfg.tokenizer).eval(), _generator(cfg.generator, seed=1)


def test_greedy_generation_is_deterministic_and_batch_invariant(tiny_models):
    tok, gen = tiny_models
    labels = torch.tensor([0, 3, 7])
    images, indices = generate(gen, tok, labels, cfg=2.0, top_k=1, seed=0)
    again, indices_again = generate(gen, tok, labels, cfg=2.0, top_k=1, seed=123)
    assert torch.equal(indices, indices_again) and torch.equal(images, again)
    for i, label in enumerate(labels.tolist()):
        single_images, single = generate(gen, tok, torch.tensor([label]), cfg=2.0, top_k=1, seed=0)
        assert torch.equal(single[0], indices[i])
        assert (single_images[0] - images[i]).abs().max() < 1e-5
    p = gen.cfg.positions
    assert indices.shape == (3, 2, p) and images.shape == (3, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    # The indices decode to the same picture through the tokenizer's own path.
    with torch.no_grad():
        assert (tok.indices_to_img(indices) - images).abs().max() < 1e-5


def test_seeded_sampling_reproducible_and_seed_sensitive(tiny_models):
    tok, gen = tiny_models
    labels = torch.tensor([2, 5])
    _, a = generate(gen, tok, labels, seed=7)
    _, b = generate(gen, tok, labels, seed=7)
    _, c = generate(gen, tok, labels, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.max()) < gen.cfg.codebook_size


def test_class_ids_out_of_range_rejected(tiny_models):
    tok, gen = tiny_models
    with pytest.raises(ValueError, match=r"class id\(s\) \[10\] outside \[0, 10\)"):
        generate(gen, tok, torch.tensor([10]))
