"""Tokenizer training with the official recipe's parts (``imagefolder-official.md`` §2).

Generator-side loss per step:

    L = MSE + w_p·perceptual + codebook + commit + w_sem·InfoNCE(branch 1, teacher)
        + [step ≥ disc_start] λ_adapt·w_disc·hinge_G(D(aug(x̂)))

- quantizer dropout: the first ⌊codebook_drop·B⌋ samples of each local batch keep a random number
  of scales (``sample_keep_scales``); they are left out of the semantic loss, as officially;
- semantic loss: the spatial mean of branch 1's straight-through f̂ against the frozen teacher's
  embedding projected by the tokenizer's own ``quant_conv`` (trained by this loss). A teacher whose
  embedding size differs from the tokenizer width goes through a trainable linear adaptor first
  (a deviation: the official teacher has the tokenizer's width);
- λ_adapt = ‖∇_last(MSE + w_p·perceptual)‖ / (‖∇_last G‖ + 1e-4) on the decoder's ``to_pixel`` weight;
- discriminator: hinge on DiffAug'd real and reconstructed images plus ``lecam_weight``·LeCAM, AdamW
  with weight decay, started at ``disc_start``;
- model EMA of the tokenizer; the exported weights are the EMA's (the generator trains on them).
- not official, for training from nothing (the official tokenizer starts from DINOv2): LayerScale γ = 1
  and 2D sin-cos grid positions (``init_from_scratch``), and the latent warm-up loss for the first
  ``latent_warmup`` steps (``latent_warmup_loss``).

Substitutes for weights that cannot ship (LPIPS, DINO discriminator, DINOv2 teacher) are described
in ``imagefolder.train.losses``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefolder.configs import ModelConfig
from imagefolder.data import collate, open_dataset
from imagefolder.errors import InputError
from imagefolder.models.quantizer import sample_keep_scales
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.train.common import (
    DistEnv,
    IndexStream,
    ModelEMA,
    adamw,
    all_reduce_mean,
    lr_factor,
    run_training,
    seed_everything,
    set_lr,
    shard,
    unwrap,
)
from imagefolder.train.losses import (
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    build_perceptual,
    clip_infonce,
    diff_augment,
    hinge_d_loss,
    hinge_g_loss,
    load_teacher,
)
from imagefolder.train.options import (
    BETAS,
    COUNT,
    DECAY,
    FRACTION,
    POSITIVE,
    SEED,
    START_STEP,
    STEPS_OR_NONE,
    WEIGHT,
    check_options,
)
from imagefolder.train.state import RunTrainer

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainConfig:
    """Options of one tokenizer run (the command's flags); out-of-range values raise ``InputError``."""

    out: str
    data: str = "shapes"
    steps: int = 3000
    batch_size: int = 32  # global, over all ranks
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 100
    final_lr: float = 0.05  # cosine decay to this fraction of lr
    ema_decay: float = 0.999
    # From-scratch initialisation (see ``init_from_scratch``): LayerScale γ (DINOv2's 1e-5 is its
    # fine-tuning value and stalls a small model trained from nothing) and 2D sin-cos grid positions.
    layer_scale_init: float = 1.0
    sincos_pos: bool = True
    # Latent warm-up (see ``latent_warmup_loss``): weight at step 0, decayed linearly to 0 at step
    # ``latent_warmup``; 0 turns it off.
    latent_warmup: int = 1000
    latent_warmup_weight: float = 1.0
    perceptual: str = "auto"  # auto | lpips | structure | none
    perceptual_weight: float = 1.0
    teacher: str = "none"  # none | auto | dinov2 | builtin | path to a classifier
    sem_weight: float = 0.1
    disc_weight: float = 0.5
    disc_start: int = 1000
    disc_lr: float = 4e-4
    disc_weight_decay: float = 5e-4
    lecam_weight: float = 0.001
    seed: int = 0
    log_every: int = 50
    save_every: int = 500
    stop_at: int | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        check_options(vars(self), _TOKENIZER_RANGES)


_TOKENIZER_RANGES = {
    "steps": COUNT,
    "batch_size": COUNT,
    "lr": POSITIVE,
    "betas": BETAS,
    "weight_decay": WEIGHT,
    "warmup": START_STEP,
    "final_lr": FRACTION,
    "ema_decay": DECAY,
    "layer_scale_init": POSITIVE,
    "latent_warmup": START_STEP,
    "latent_warmup_weight": WEIGHT,
    "perceptual_weight": WEIGHT,
    "sem_weight": WEIGHT,
    "disc_weight": WEIGHT,
    "disc_start": START_STEP,
    "disc_lr": POSITIVE,
    "disc_weight_decay": WEIGHT,
    "lecam_weight": WEIGHT,
    "seed": SEED,
    "log_every": COUNT,
    "save_every": COUNT,
    "stop_at": STEPS_OR_NONE,
}


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """2D sin-cos position table (G², W): a quarter of the channels each for sin/cos of row and column."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    r, c = torch.outer(rows.flatten(), omega), torch.outer(cols.flatten(), omega)
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()
    return F.pad(table, (0, width - table.shape[1]))


@torch.no_grad()
def init_from_scratch(tokenizer: Tokenizer, layer_scale: float, sincos_pos: bool) -> None:
    """Initialisation for training a tokenizer from nothing (not part of the official, fine-tuned recipe).

    - every LayerScale γ set to ``layer_scale`` (the module default, 1e-5, is DINOv2's and leaves the
      residual branches silent for hundreds of steps of a small CPU run);
    - with ``sincos_pos``, the grid position embeddings of encoder and decoder are a fixed-amplitude
      2D sin-cos table (still trained): the K×K latent positions are resampled from it, so latents
      and patches start with matching, distinct positions instead of 0.02-std noise.
    """
    from imagefolder.models.vit import LayerScale, VisionTransformer

    for part in (tokenizer.encoder, tokenizer.decoder):  # not the frozen teacher
        for m in part.modules():
            if isinstance(m, LayerScale):
                m.gamma.fill_(layer_scale)
            if sincos_pos and isinstance(m, VisionTransformer):
                m.pos_embed[0, 1:] = sincos_2d(m.grid, m.pos_embed.shape[-1]).to(m.pos_embed.dtype)


def latent_warmup_loss(tokenizer: Tokenizer, latent_tokens: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """MSE between the first 3 channels of every branch's latent f and the image area-downsampled to K×K.

    Not part of the official recipe. A ViT tokenizer trained from scratch starts at a symmetric point:
    the encoder's latent tokens attend uniformly (so they carry only image-wide statistics) and the
    decoder has no reason to read them position by position, so the reconstruction stays at the
    per-image mean colour for hundreds of steps. Asking each latent to hold its own region's colour
    breaks the symmetry at once; the weight decays to 0 so the rest of the run is the plain recipe.

    Args:
        latent_tokens: the encoder's output (B, nb·K², W) of the same forward.
        img: (B, 3, H, W) in [-1, 1].
    """
    k, nb = tokenizer.cfg.latent_size, tokenizer.cfg.num_branches
    f = F.linear(latent_tokens, tokenizer.quant_conv.weight.flatten(1), tokenizer.quant_conv.bias)  # (B, nb·K², Z)
    target = F.adaptive_avg_pool2d(img, k).flatten(2).transpose(1, 2)  # (B, K², 3)
    return F.mse_loss(f[..., :3], target.repeat(1, nb, 1))


class TokenizerTrainer(RunTrainer):
    """Owns tokenizer, EMA, discriminator, optimizers and data stream; ``step`` is one optimisation step."""

    kind = "tokenizer"
    export_meta = {"weights": "ema"}

    def __init__(self, opts: TokenizerTrainConfig, config: ModelConfig, env: DistEnv) -> None:
        super().__init__(opts, config, env)
        dev = env.device
        torch.manual_seed(opts.seed)  # identical initial weights on every rank
        tokenizer = Tokenizer(config.tokenizer)
        init_from_scratch(tokenizer, opts.layer_scale_init, opts.sincos_pos)
        tokenizer = tokenizer.to(dev).train()
        self.ema = ModelEMA(tokenizer, opts.ema_decay)
        self.disc = PatchDiscriminator().to(dev).train() if opts.disc_weight > 0 else None
        self.lecam = LeCAM().to(dev)
        self.perceptual = build_perceptual(opts.perceptual) if opts.perceptual_weight > 0 else None
        if self.perceptual is not None:
            self.perceptual.to(dev)
        self.teacher, self.sem_adaptor, self.semantic = self._build_teacher(tokenizer)
        seed_everything(opts.seed + env.rank)  # per-rank streams for dropout and augmentation
        trained = nn.ModuleDict({"tokenizer": tokenizer})
        if self.sem_adaptor is not None:
            trained["sem_adaptor"] = self.sem_adaptor
        self.tokenizer: nn.Module = tokenizer
        self.disc_model: nn.Module | None = self.disc
        if env.distributed:
            ids = [dev] if dev.type == "cuda" else None
            self.tokenizer = nn.parallel.DistributedDataParallel(tokenizer, device_ids=ids)
            if self.disc is not None:
                self.disc_model = nn.parallel.DistributedDataParallel(self.disc, device_ids=ids)
        self.optimizer = adamw(trained, opts.lr, opts.weight_decay, opts.betas)
        self.disc_optimizer: torch.optim.Optimizer | None = None
        if self.disc is not None:
            self.disc_optimizer = torch.optim.AdamW(
                self.disc.parameters(), lr=opts.disc_lr, betas=opts.betas, weight_decay=opts.disc_weight_decay
            )
        self.dataset = open_dataset(opts.data, config.tokenizer.image_size)
        self.stream = IndexStream(len(self.dataset), opts.seed)
        self.step_count = 0
        # The encoder's latent tokens of the current forward, for the latent warm-up loss.
        self._latent_tokens: torch.Tensor | None = None
        tokenizer.encoder.register_forward_hook(self._keep_latent_tokens)

    def _keep_latent_tokens(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._latent_tokens = output if self._warmup_weight() > 0 else None

    def _warmup_weight(self) -> float:
        opts = self.opts
        if opts.latent_warmup <= 0 or self.step_count >= opts.latent_warmup or self.config.tokenizer.code_dim < 3:
            return 0.0
        return opts.latent_warmup_weight * (1 - self.step_count / opts.latent_warmup)

    def _build_teacher(self, tokenizer: Tokenizer) -> tuple[nn.Module | None, nn.Module | None, bool]:
        # -> (external teacher, its adaptor to the tokenizer width, whether the semantic loss is on)
        spec = self.opts.teacher
        if self.opts.sem_weight <= 0 or spec == "none":
            return None, None, False
        if spec == "builtin" or (spec == "auto" and tokenizer.cfg.with_teacher):
            if not tokenizer.cfg.with_teacher:
                raise InputError("teacher 'builtin' needs a tokenizer config with_teacher=True")
            return None, None, True  # the tokenizer's own semantic_model (tokenizer.teacher_features)
        teacher = load_teacher(spec, self.env.device)
        width = tokenizer.cfg.width
        adaptor = None if teacher.dim == width else nn.Linear(teacher.dim, width, bias=False).to(self.env.device)
        return teacher, adaptor, True

    def _teacher_target(self, img: torch.Tensor) -> torch.Tensor:
        """Teacher embedding projected by quant_conv: (B, Z)."""
        tok = unwrap(self.tokenizer)
        if self.teacher is None:
            return tok.teacher_features(img)
        feats = self.teacher.embed(img)  # (B, D)
        if self.sem_adaptor is not None:
            feats = self.sem_adaptor(feats)  # (B, W)
        return F.linear(feats, tok.quant_conv.weight.flatten(1), tok.quant_conv.bias)

    def next_batch(self) -> torch.Tensor:
        """This rank's shard of the next global batch of images (b, 3, H, W)."""
        img, _ = collate(self.dataset, shard(self.stream.next_batch(self.opts.batch_size), self.env))
        return img.to(self.env.device)

    def step(self, img: torch.Tensor | None = None) -> dict[str, float]:
        """One tokenizer step on ``img`` (default: the next batch), then one discriminator step once on."""
        opts, cfg = self.opts, self.config.tokenizer
        lr_mult = lr_factor(self.step_count, opts.steps, opts.warmup, "cosine", opts.final_lr)
        set_lr(self.optimizer, opts.lr * lr_mult)
        img = self.next_batch() if img is None else img
        b = img.shape[0]
        keep = sample_keep_scales(cfg, b).to(img.device)
        recon, vq, fhat_sem = self.tokenizer(img, keep)
        mse = F.mse_loss(recon, img)
        nll = mse
        metrics = {"mse": mse.item(), "lr": opts.lr * lr_mult}
        if self.perceptual is not None:
            perc = self.perceptual(recon, img).mean()
            nll = nll + opts.perceptual_weight * perc
            metrics["perceptual"] = perc.item()
        loss = nll + vq["codebook"] + vq["commit"]
        metrics.update(codebook=vq["codebook"].item(), commit=vq["commit"].item())
        warm = self._warmup_weight()
        if warm > 0 and self._latent_tokens is not None:
            aux = latent_warmup_loss(unwrap(self.tokenizer), self._latent_tokens, img)
            loss = loss + warm * aux
            metrics["latent_warmup"] = aux.item()
        self._latent_tokens = None
        if self.semantic:
            dropped = int(cfg.codebook_drop * b)  # quantizer-dropout samples are left out
            student = fhat_sem[dropped:].mean(dim=(2, 3))  # (b', Z)
            sem = clip_infonce(student, self._teacher_target(img[dropped:]))
            loss = loss + opts.sem_weight * sem
            metrics["semantic"] = sem.item()
        disc = self.disc_model if self.step_count >= opts.disc_start else None
        if disc is not None:
            g_loss = hinge_g_loss(disc(diff_augment(recon)))
            last = unwrap(self.tokenizer).decoder.to_pixel.model.weight
            weight = adaptive_weight(nll, g_loss, last)
            loss = loss + weight * opts.disc_weight * g_loss
            metrics.update(g_loss=g_loss.item(), adaptive_weight=weight.item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.update(self.tokenizer)
        if disc is not None:
            metrics.update(self._disc_step(disc, img, recon.detach()))
        metrics["loss"] = loss.item()
        self.step_count += 1
        return metrics

    def _disc_step(self, disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        d_real = disc(diff_augment(real))
        d_fake = disc(diff_augment(fake))
        hinge = hinge_d_loss(d_real, d_fake)
        lecam = self.lecam(d_real, d_fake)
        d_loss = self.opts.disc_weight * (hinge + self.opts.lecam_weight * lecam)
        optimizer = self.disc_optimizer
        assert optimizer is not None  # made with the discriminator
        optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        optimizer.step()
        self.lecam.update(all_reduce_mean(d_real.mean(), self.env), all_reduce_mean(d_fake.mean(), self.env))
        return {"d_loss": d_loss.item(), "lecam": lecam.item()}

    # ----- what state.pt holds, and the export

    def stateful(self) -> dict[str, Any]:
        parts = {"model": unwrap(self.tokenizer), "ema": self.ema, "optimizer": self.optimizer, "lecam": self.lecam}
        if self.sem_adaptor is not None:
            parts["sem_adaptor"] = self.sem_adaptor
        if self.disc is not None:
            parts.update(disc=self.disc, disc_optimizer=self.disc_optimizer)
        return parts

    def exported_states(self) -> tuple[dict[str, torch.Tensor], None]:
        """The EMA tokenizer (the generator trains on it); no generator."""
        return self.ema.state_dict(), None


def train_tokenizer(
    opts: TokenizerTrainConfig, env: DistEnv, config: ModelConfig, progress: bool = True
) -> TokenizerTrainer:
    """Run (or resume) a tokenizer training; exports ``tokenizer.safetensors`` (EMA) when finished."""
    trainer = TokenizerTrainer(opts, config, env)
    return run_training(trainer, opts, env, "tokenizer", "tokenizer.safetensors", ("loss", "mse"), progress)
