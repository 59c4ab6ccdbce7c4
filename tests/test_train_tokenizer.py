"""Tokenizer trainer and its losses on tiny shapes: every recipe part switched on lowers the loss on a
fixed batch, resume is bit-identical, and each loss behaves as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagefolder.configs import tiny
from imagefolder.train.classifier import Classifier, ClassifierConfig, save_classifier
from imagefolder.train.common import DistEnv, IndexStream, lr_factor
from imagefolder.train.eval import frechet_distance, psnr
from imagefolder.train.losses import (
    LeCAM,
    StructureLoss,
    adaptive_weight,
    build_perceptual,
    clip_infonce,
    diff_augment,
    hinge_d_loss,
    ssim,
)
from imagefolder.train.tokenizer import (
    TokenizerTrainConfig,
    TokenizerTrainer,
    latent_warmup_loss,
    sincos_2d,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "classifier.safetensors"
    save_classifier(path, Classifier(ClassifierConfig(width=8, feature_dim=64)))  # 64 != width 128: adaptor
    return path


def _opts(out, teacher, **kw) -> TokenizerTrainConfig:
    base = {
        "steps": 4,
        "batch_size": 4,
        "warmup": 1,
        "perceptual": "structure",
        "teacher": str(teacher),
        "disc_start": 0,
        "log_every": 1,
        "save_every": 100,
    }
    return TokenizerTrainConfig(out=str(out), **{**base, **kw})


def test_all_parts_lower_the_loss_on_fixed_batch(tmp_path, teacher_path):
    torch.manual_seed(0)
    opts = _opts(tmp_path, teacher_path, steps=100, lr=2e-3, disc_start=3, batch_size=4)
    trainer = TokenizerTrainer(opts, tiny(), DistEnv())
    assert trainer.sem_adaptor is not None and trainer.disc is not None
    img = trainer.next_batch()
    rows = [trainer.step(img) for _ in range(6)]
    assert {"perceptual", "semantic", "g_loss", "adaptive_weight", "d_loss", "lecam"} <= set(rows[-1])
    recon = [r["mse"] + r["perceptual"] for r in rows]
    assert recon[-1] < 0.8 * recon[0], recon
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The EMA moved towards the weights but is not equal to them.
    ema = trainer.ema.model.decoder.to_pixel.model.weight
    assert not torch.equal(ema, trainer.tokenizer.decoder.to_pixel.model.weight)


def test_resume_is_bit_identical(tmp_path, teacher_path):
    straight = train_tokenizer(_opts(tmp_path / "a", teacher_path), DistEnv(), tiny(), progress=False)
    train_tokenizer(_opts(tmp_path / "b", teacher_path, stop_at=2), DistEnv(), tiny(), progress=False)
    resumed = train_tokenizer(_opts(tmp_path / "b", teacher_path), DistEnv(), tiny(), progress=False)
    for part in ("tokenizer", "disc", "sem_adaptor"):
        a, b = getattr(straight, part).state_dict(), getattr(resumed, part).state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name}"
    for name, value in straight.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[name]), f"ema.{name}"
    assert torch.equal(straight.lecam.ema_real, resumed.lecam.ema_real)
    assert (tmp_path / "b" / "tokenizer.safetensors").is_file()


def test_from_scratch_init_and_latent_warmup(tmp_path):
    opts = _opts(tmp_path, "none", perceptual="none", sem_weight=0, disc_weight=0, latent_warmup=4)
    trainer = TokenizerTrainer(opts, tiny(), DistEnv())
    tok = trainer.tokenizer
    assert torch.all(tok.encoder.model.blocks[0].ls1.gamma == 1.0)
    assert torch.allclose(tok.decoder.model.pos_embed[0, 1:], sincos_2d(tok.cfg.grid, tok.cfg.width))
    img = trainer.next_batch()
    rows = [trainer.step(img) for _ in range(5)]
    # Weight 1 -> 0 over the first 4 steps; off afterwards.
    assert all("latent_warmup" in r for r in rows[:4]) and "latent_warmup" not in rows[4]
    # The loss is the MSE of f's first 3 channels against the K×K area-downsampled image.
    k = tok.cfg.latent_size
    tokens = tok.encoder(img)
    f = torch.cat(tok.encode(img), dim=0)[:, :3]  # (nb·B, 3, K, K), branch-major
    target = torch.nn.functional.adaptive_avg_pool2d(img, k).repeat(tok.cfg.num_branches, 1, 1, 1)
    assert torch.allclose(latent_warmup_loss(tok, tokens, img), (f - target).square().mean(), atol=1e-6)
    plain = {"perceptual": "none", "sem_weight": 0, "disc_weight": 0}
    off_opts = _opts(tmp_path / "off", "none", latent_warmup=0, layer_scale_init=1e-5, sincos_pos=False, **plain)
    off = TokenizerTrainer(off_opts, tiny(), DistEnv())
    assert torch.all(off.tokenizer.encoder.model.blocks[0].ls1.gamma == 1e-5)
    assert "latent_warmup" not in off.step(img)


# ----- losses


def test_structure_loss_and_ssim():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert StructureLoss()(x, x).abs().item() < 1e-5
    assert StructureLoss()(x.flip(-1), x).item() > 0.1
    assert torch.allclose(ssim(x * 0.5 + 0.5, x * 0.5 + 0.5), torch.ones(2))
    assert build_perceptual("none") is None
    assert isinstance(build_perceptual("structure"), StructureLoss)


def test_diff_augment_is_differentiable_and_random():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    y = diff_augment(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not torch.equal(diff_augment(x), diff_augment(x))


def test_lecam_and_hinge():
    lecam = LeCAM(decay=0.0)
    real, fake = torch.tensor([2.0, 2.0]), torch.tensor([-2.0, -2.0])
    lecam.update(real, fake)
    assert lecam.ema_real.item() == 2.0 and lecam.ema_fake.item() == -2.0
    assert lecam(real, fake).item() == pytest.approx(32.0)  # (2 - -2)² twice
    assert lecam(fake, real).item() == 0.0
    assert hinge_d_loss(torch.full((3,), 1.5), torch.full((3,), -1.5)).item() == 0.0


def test_adaptive_weight_balances_gradients():
    last = torch.nn.Parameter(torch.ones(3))
    rec = (last * 4).sum()
    g = (last * 2).sum()
    assert adaptive_weight(rec, g, last).item() == pytest.approx(2.0, rel=1e-3)


def test_infonce_prefers_matching_pairs():
    t = torch.eye(8) * 5
    assert clip_infonce(t, t).item() < clip_infonce(t, t.roll(1, 0)).item()


def test_schedule_stream_and_metrics():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "linear", 0.01) == pytest.approx(0.01)
    stream = IndexStream(10, seed=3)
    first = stream.next_batch(25).tolist()
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    again = IndexStream(10, seed=3, consumed=20)
    assert again.next_batch(5).tolist() == first[20:]
    x = torch.rand(2, 3, 8, 8)
    assert psnr(x, (x + 0.1).clamp(max=1)).min() > 19
    feats = np.random.default_rng(0).normal(size=(500, 4))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats, feats + 1.0) == pytest.approx(4.0, rel=1e-3)
