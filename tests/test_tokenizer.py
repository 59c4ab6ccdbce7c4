"""Tokenizer tests: official state_dict layout, resampling matrices, and the quantizer's numerics
(indices round trip, quantizer dropout, generator input) on the tiny config with random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from imagefolder.configs import official, tiny
from imagefolder.models.quantizer import MultiScaleQuantizer, sample_keep_scales
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.models.vit import LayerScale, resample_grid_pos_embed
from imagefolder.resample import apply_matrix, area_matrix, bicubic_matrix
from tests.reference import official_keys


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]


def _meta_tokenizer(codebook_size: int) -> Tokenizer:
    with torch.device("meta"):
        return Tokenizer(official(codebook_size).tokenizer)


def _random_tokenizer(cfg, seed: int = 0) -> Tokenizer:
    """Random weights with live residual branches and codebook rows of varied norms."""
    torch.manual_seed(seed)
    tok = Tokenizer(cfg).eval()
    with torch.no_grad():
        for m in tok.modules():
            if isinstance(m, LayerScale):
                m.gamma.fill_(1.0)
        for q in tok.quantizes:
            q.embedding.weight.normal_()
    return tok


# ----- official layout


def test_official_state_dict_matches_reference():
    assert _layout(_meta_tokenizer(4096)) == official_keys("VAE")


@pytest.mark.parametrize("codebook_size", [8192, 16384])
def test_codebook_variants_change_only_the_codebook(codebook_size):
    base = dict((k, s) for k, s, _ in _layout(_meta_tokenizer(4096)))
    other = _layout(_meta_tokenizer(codebook_size))
    assert [k for k, _, _ in other] == list(base)
    changed = {k: s for k, s, _ in other if s != base[k]}
    assert set(changed) == {f"quantizes.{b}.{n}" for b in (0, 1) for n in ("embedding.weight", "ema_vocab_hit_SV")}
    for b in (0, 1):
        assert changed[f"quantizes.{b}.embedding.weight"] == (codebook_size, 32)
        assert changed[f"quantizes.{b}.ema_vocab_hit_SV"] == (10, codebook_size)


def test_official_phi_index():
    assert official().tokenizer.phi_index == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


# ----- resampling


def test_resample_matrices_match_interpolate():
    cfg = official().tokenizer
    k = cfg.latent_size
    torch.manual_seed(0)
    x = torch.randn(2, 32, k, k, dtype=torch.float64)
    q = MultiScaleQuantizer(cfg)
    for si, pn in enumerate(cfg.scales):
        down = F.interpolate(x, size=(pn, pn), mode="area")
        assert torch.allclose(apply_matrix(x, area_matrix(k, pn), pn), down, atol=1e-6, rtol=0)
        assert torch.allclose(q.downsample(x.float(), si), down.float().flatten(2), atol=1e-6, rtol=0)
        small = x[..., :pn, :pn]
        up = F.interpolate(small, size=(k, k), mode="bicubic", align_corners=False)
        assert torch.allclose(apply_matrix(small, bicubic_matrix(pn, k), k), up, atol=1e-6, rtol=0)
        assert torch.allclose(q.upsample(small.float().flatten(2), si), up.float(), atol=1e-6, rtol=0)


def test_grid_pos_embed_resample_is_antialiased_bicubic():
    torch.manual_seed(0)
    pos = torch.randn(1, 16 * 16, 8)
    out = resample_grid_pos_embed(pos, 11)
    grid = pos.reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(11, 11), mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(out, ref.permute(0, 2, 3, 1).reshape(1, 121, 8))
    assert resample_grid_pos_embed(pos, 16) is pos


# ----- numerics on the tiny config


def test_indices_to_img_equals_reconstruct():
    cfg = tiny().tokenizer
    tok = _random_tokenizer(cfg)
    torch.manual_seed(1)
    img = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        indices = tok.img_to_indices(img)
        assert indices.shape == (2, cfg.num_branches, cfg.positions) and indices.dtype == torch.long
        assert indices.unique().numel() > 20  # the codes are not degenerate
        assert not torch.equal(indices[0], indices[1])  # the image reaches the latents
        recon = tok.reconstruct(img)
        decoded = tok.indices_to_img(indices)
    assert recon.shape == img.shape and recon.abs().max() <= 1
    assert (decoded - recon).abs().max() < 1e-5


def test_img_to_indices_is_deterministic():
    cfg = tiny().tokenizer
    tok = _random_tokenizer(cfg, seed=2)
    img = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        first = tok.img_to_indices(img)
        again = tok.img_to_indices(img)
        precomputed = tok.img_to_indices(img, tok.encoder.latent_pos())
        assert torch.equal(tok.indices_to_img(first), tok.indices_to_img(again, tok.decoder.latent_pos()))
    assert torch.equal(first, again) and torch.equal(first, precomputed)


def test_quantizer_dropout_accumulates_kept_scales_only():
    cfg = tiny().tokenizer
    tok = _random_tokenizer(cfg, seed=3)
    q = tok.quantizes[0]
    torch.manual_seed(4)
    f = torch.randn(3, cfg.code_dim, cfg.latent_size, cfg.latent_size)
    keep = torch.tensor([2, len(cfg.scales), 3])
    with torch.no_grad():
        fhat, codebook, commit, indices = q(f, keep)
        # The residual runs through every scale, whatever is kept.
        assert all(torch.equal(a, b) for a, b in zip(indices, q.f_to_indices(f), strict=True))
        parts = [q.embed_scale(idx, si) for si, idx in enumerate(indices)]  # SN × (B, Z, K, K)
        cum = torch.stack(parts).cumsum(0)  # (SN, B, Z, K, K)
        for b, n in enumerate(keep.tolist()):
            assert torch.allclose(fhat[b], cum[n - 1, b], atol=1e-5)
        mask = (keep.view(1, -1) > torch.arange(len(cfg.scales)).view(-1, 1)).float()  # (SN, B)
        per_scale = ((cum - f).square().mean(dim=(2, 3, 4)) * mask).sum(1) / mask.sum(1)  # (SN,)
    assert torch.allclose(codebook, per_scale.mean(), rtol=1e-5)
    assert torch.allclose(commit, cfg.beta * per_scale.sum(), rtol=1e-5)
    with torch.no_grad():
        full = q(f)[0]
    assert torch.allclose(full, cum[-1], atol=1e-5)
    assert torch.allclose(full, q.f_to_fhat(f), atol=1e-6)


def test_sample_keep_scales_rule():
    cfg = tiny().tokenizer
    keep = sample_keep_scales(cfg, 40, torch.Generator().manual_seed(0))
    dropped = int(cfg.codebook_drop * 40)
    assert (keep[dropped:] == len(cfg.scales)).all()
    assert ((keep[:dropped] >= cfg.start_drop) & (keep[:dropped] <= len(cfg.scales))).all()


def test_generator_input_is_area_down_of_running_fhat():
    cfg = tiny().tokenizer
    tok = _random_tokenizer(cfg, seed=5)
    torch.manual_seed(6)
    indices = torch.randint(cfg.codebook_size, (2, cfg.num_branches, cfg.positions))
    with torch.no_grad():
        got = tok.indices_to_generator_input(indices)
        assert got.shape == (2, cfg.positions - 1, cfg.num_branches * cfg.code_dim)
        offs = tok.quantizes[0].offsets
        pos = 0
        for si_next in range(1, len(cfg.scales)):
            prefix = [
                [indices[:, b, offs[si] : offs[si + 1]] for si in range(si_next)] for b in range(cfg.num_branches)
            ]
            fhat = torch.cat([q.indices_to_fhat(p) for q, p in zip(tok.quantizes, prefix, strict=True)], dim=1)
            pn = cfg.scales[si_next]
            ref = F.interpolate(fhat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
            assert torch.allclose(got[:, pos : pos + pn * pn], ref, atol=1e-5)
            assert torch.allclose(tok.next_scale_input(fhat, si_next), ref, atol=1e-5)
            pos += pn * pn
        # The folded embed of one scale is the per-branch contributions, branch 0 first.
        tokens = indices[:, :, offs[2] : offs[3]].transpose(1, 2)  # (B, q, nb)
        both = tok.embed_scale(tokens, 2)
        z = cfg.code_dim
        assert torch.equal(both[:, :z], tok.quantizes[0].embed_scale(tokens[..., 0], 2))
        assert torch.equal(both[:, z:], tok.quantizes[1].embed_scale(tokens[..., 1], 2))
        # indices_to_fhat accepts the concatenated (B, P) form and the per-scale list alike.
        full = tok.indices_to_fhat(indices)
        listed = tok.quantizes[1].indices_to_fhat([indices[:, 1, offs[si] : offs[si + 1]] for si in range(5)])
        assert torch.equal(full[:, z:], listed)


def test_decoder_unpatchify_order():
    cfg = tiny().tokenizer
    tok = _random_tokenizer(cfg, seed=7)
    captured = {}
    tok.decoder.to_pixel.register_forward_hook(lambda m, i, o: captured.setdefault("pix", o))
    k = cfg.latent_size
    with torch.no_grad():
        img = tok._decode(torch.randn(1, cfg.num_branches * cfg.code_dim, k, k))
    pix, p, g = captured["pix"], cfg.patch_size, cfg.grid  # (1, G², p·p·3)
    for c, y, x in [(0, 0, 0), (2, 5, 9), (1, 63, 17), (2, 40, 63)]:
        expect = pix[0, (y // p) * g + x // p, ((y % p) * p + x % p) * 3 + c]
        assert img[0, c, y, x] == expect


def test_training_forward_backward_and_teacher():
    cfg = tiny().tokenizer
    torch.manual_seed(8)
    tok = Tokenizer(dataclasses.replace(cfg, with_teacher=True)).train()
    assert not tok.semantic_model.training
    img = torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1
    recon, losses, fhat_sem = tok(img, torch.tensor([3, 5, 5, 5]))
    target = tok.teacher_features(img)
    assert recon.shape == img.shape and fhat_sem.shape == (4, cfg.code_dim, cfg.latent_size, cfg.latent_size)
    assert target.shape == (4, cfg.code_dim)
    sem = (fhat_sem.mean((2, 3)) - target).square().mean()
    loss = recon.square().mean() + losses["codebook"] + losses["commit"] + sem
    loss.backward()
    assert tok.encoder.latent_tokens.grad is not None and tok.quant_conv.weight.grad is not None
    assert tok.quantizes[1].embedding.weight.grad.abs().sum() > 0
    assert tok.quantizes[0].quant_resi.qresi_ls[0].weight.grad is not None
    assert all(p.grad is None for p in tok.semantic_model.parameters())
    assert tok.quantizes[0].ema_vocab_hit_SV.sum() > 0


def test_state_dict_round_trip_strict():
    cfg = tiny().tokenizer
    src = _random_tokenizer(cfg, seed=9)
    dst = Tokenizer(cfg).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    img = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(dst.reconstruct(img), src.reconstruct(img))


@pytest.mark.slow
def test_official_width_round_trip():
    cfg = dataclasses.replace(official().tokenizer, with_teacher=False)
    tok = _random_tokenizer(cfg, seed=10)
    img = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        indices = tok.img_to_indices(img)
        assert indices.shape == (1, 2, 286)
        assert (tok.indices_to_img(indices) - tok.reconstruct(img)).abs().max() < 1e-5
