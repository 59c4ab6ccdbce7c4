"""The ImageFolder tokenizer (official ``VQModel``, "MSVR10P2"): ViT encoder with learned latent
tokens, a product of multi-scale residual quantizers (branch 0 = detail, branch 1 = semantic),
and a ViT decoder that paints mask tokens from the quantized latents.

The module tree reproduces the official ``state_dict`` (listed in ``tests/data/official-state-dict-keys.txt``)
so the released checkpoints load with ``strict=True``, the frozen DINOv2 teacher (``semantic_model``)
included when ``cfg.with_teacher``.

The K×K latent position embeddings are bicubic-antialiased resamplings of the ViT's own grid
embeddings. Every forward recomputes them unless they are passed in (``latent_pos``): export passes
precomputed ones, because an antialiased bicubic Resize has no TensorRT equivalent.

Shape letters: B batch, W width, Z code dim per branch, K finest latent side, G patches per side,
P tokens per branch over all scales, q tokens of one scale, pn its side, nb branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagefolder.configs import TokenizerConfig
from imagefolder.models.quantizer import MultiScaleQuantizer
from imagefolder.models.vit import VisionTransformer, resample_grid_pos_embed

# The teacher sees ImageNet-normalised [0, 1] images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _trunk(cfg: TokenizerConfig, with_patch_embed: bool) -> VisionTransformer:
    patch = cfg.patch_size if with_patch_embed else None
    return VisionTransformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.grid, patch)


class LatentEncoder(nn.Module):
    """ViT over [cls, G² patches, nb·K² latent tokens]; outputs the normalised latent tokens."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.size = cfg.latent_size
        self.num_branches = cfg.num_branches
        num_image = cfg.grid**2 + 1
        self.latent_tokens = nn.Parameter(torch.empty(1, cfg.num_branches * cfg.num_latents, cfg.width))
        # Level of each token: 0 for cls and patches, 1 + b for the latents of branch b.
        levels = [0] * num_image + [1 + b for b in range(cfg.num_branches) for _ in range(cfg.num_latents)]
        self.register_buffer("lvl1LC", torch.tensor([levels], dtype=torch.long))
        self.model = _trunk(cfg, with_patch_embed=True)
        self.lvl_embed = nn.Embedding(1 + cfg.num_branches, cfg.width)
        nn.init.normal_(self.latent_tokens, std=1e-6)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=0.02)

    def latent_pos(self) -> torch.Tensor:
        """Position embeddings of the K×K latent grid: (1, K², W)."""
        return resample_grid_pos_embed(self.model.grid_pos_embed(), self.size)

    def forward(self, img: torch.Tensor, latent_pos: torch.Tensor | None = None) -> torch.Tensor:
        # img (B, 3, H, W) -> latent tokens (B, nb·K², W)
        if latent_pos is None:
            latent_pos = self.latent_pos()
        x = self.model.embed_image(img)  # (B, 1 + G², W)
        latents = self.latent_tokens + latent_pos.repeat(1, self.num_branches, 1)  # (1, nb·K², W)
        x = torch.cat([x, latents + x[:, :1] * 0], dim=1)  # (B, 1 + G² + nb·K², W)
        x = self.model.run_blocks(x + self.lvl_embed(self.lvl1LC))
        return x[:, -latents.shape[1] :]


class ToPixel(nn.Module):
    """Linear head from a token to one patch of pixels (official ``to_pixel='linear'``)."""

    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        self.model = nn.Linear(width, patch_size * patch_size * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LatentDecoder(nn.Module):
    """ViT over [cls, G² mask tokens, cls, K² latents]; the mask-token outputs become the pixels."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.size = cfg.latent_size
        self.grid = cfg.grid
        self.patch_size = cfg.patch_size
        self.mask_token = nn.Parameter(torch.empty(1, 1, cfg.width))
        # Level 0 for [cls, mask tokens], 1 for [cls, latents].
        levels = [0] * (cfg.grid**2 + 1) + [1] * (cfg.num_latents + 1)
        self.register_buffer("lvl1LC", torch.tensor([levels], dtype=torch.long))
        self.model = _trunk(cfg, with_patch_embed=False)
        self.lvl_embed = nn.Embedding(2, cfg.width)
        self.to_pixel = ToPixel(cfg.width, cfg.patch_size)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=0.02)

    def latent_pos(self) -> torch.Tensor:
        """Position embeddings of the K×K latent grid: (1, K², W)."""
        return resample_grid_pos_embed(self.model.grid_pos_embed(), self.size)

    def forward(self, z: torch.Tensor, latent_pos: torch.Tensor | None = None) -> torch.Tensor:
        # z (B, K², W) -> image (B, 3, H, W), not clamped
        if latent_pos is None:
            latent_pos = self.latent_pos()
        g, p = self.grid, self.patch_size
        mask_tokens = self.mask_token + z[:, :1] * 0  # (B, 1, W), broadcast: batch stays dynamic
        slots = self.model.prepend_cls(mask_tokens.expand(-1, g * g, -1), self.model.grid_pos_embed())
        latents = self.model.prepend_cls(z, latent_pos)  # (B, 1 + K², W)
        x = torch.cat([slots, latents], dim=1)  # (B, 1 + G² + 1 + K², W)
        x = self.model.run_blocks(x + self.lvl_embed(self.lvl1LC))
        x = self.to_pixel(x[:, 1 : 1 + g * g])  # (B, G², p·p·3), index (row·p + col)·3 + channel
        x = x.view(-1, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, G, p, G, p)
        return x.reshape(-1, 3, g * p, g * p)


class Tokenizer(nn.Module):
    """Image <-> per-branch multi-scale token indices (official ``VQModel`` layout)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nb, z = cfg.num_branches, cfg.code_dim
        self.encoder = LatentEncoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.width, z, 1)
        self.decoder = LatentDecoder(cfg)
        self.post_quant_conv = nn.Conv2d(nb * z, cfg.width, 1)
        self.quantizes = nn.ModuleList(MultiScaleQuantizer(cfg) for _ in range(nb))
        if cfg.with_teacher:
            # Frozen DINOv2 teacher of the semantic loss; present in every official file.
            self.semantic_model = _trunk(cfg, with_patch_embed=True).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Tokenizer:
        super().train(mode)
        if self.cfg.with_teacher:
            self.semantic_model.eval()
        return self

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        # quant_conv (1×1) as a linear map on tokens: (..., W) -> (..., Z)
        return F.linear(x, self.quant_conv.weight.flatten(1), self.quant_conv.bias)

    # ----- image -> latents -> indices

    def encode(self, img: torch.Tensor, latent_pos: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> one latent f (B, Z, K, K) per branch.

        ``latent_pos`` is the encoder's ``encoder.latent_pos()``; None recomputes it.
        """
        k = self.cfg.latent_size
        x = self._project(self.encoder(img, latent_pos))  # (B, nb·K², Z)
        return [f.transpose(1, 2).unflatten(2, (k, k)) for f in x.split(k * k, dim=1)]  # nb × (B, Z, K, K)

    def img_to_indices(self, img: torch.Tensor, latent_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) -> LongTensor (B, nb, P): scales concatenated in raster order."""
        fs = self.encode(img, latent_pos)
        per_branch = [torch.cat(q.f_to_indices(f), dim=1) for q, f in zip(self.quantizes, fs, strict=True)]  # (B, P)
        return torch.stack(per_branch, dim=1)

    # ----- indices -> latents -> image

    def indices_to_fhat(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, nb, P) -> f̂ (B, nb·Z, K, K), branch 0 channels first."""
        return torch.cat([q.indices_to_fhat(indices[:, i]) for i, q in enumerate(self.quantizes)], dim=1)

    def _decode(self, fhat: torch.Tensor, latent_pos: torch.Tensor | None = None) -> torch.Tensor:
        # f̂ (B, nb·Z, K, K) -> image (B, 3, H, W), not clamped
        z = self.post_quant_conv(fhat).flatten(2).transpose(1, 2)  # (B, K², W)
        return self.decoder(z, latent_pos)

    def fhat_to_img(self, fhat: torch.Tensor, latent_pos: torch.Tensor | None = None) -> torch.Tensor:
        """f̂ (B, nb·Z, K, K) -> image (B, 3, H, W) clamped to [-1, 1].

        ``latent_pos`` is the decoder's ``decoder.latent_pos()``; None recomputes it.
        """
        return self._decode(fhat, latent_pos).clamp(-1, 1)

    def indices_to_img(self, indices: torch.Tensor, latent_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (B, nb, P) -> image (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.indices_to_fhat(indices), latent_pos)

    def reconstruct(self, img: torch.Tensor) -> torch.Tensor:
        """The tokenizer's own round trip: encode, quantize each branch straight to f̂, decode; clamped."""
        fhat = torch.cat([q.f_to_fhat(f) for q, f in zip(self.quantizes, self.encode(img), strict=True)], dim=1)
        return self.fhat_to_img(fhat)

    # ----- generator interface (folded tokens)

    def embed_scale(self, tokens: torch.Tensor, si: int) -> torch.Tensor:
        """Contribution of scale si to f̂ from folded tokens (B, q, nb) -> (B, nb·Z, K, K)."""
        return torch.cat([q.embed_scale(tokens[..., i], si) for i, q in enumerate(self.quantizes)], dim=1)

    def next_scale_input(self, fhat: torch.Tensor, si_next: int) -> torch.Tensor:
        """Folded generator input of scale ``si_next``: area_down(f̂) (B, nb·Z, K, K) -> (B, pn², nb·Z)."""
        return self.quantizes[0].downsample(fhat, si_next).transpose(1, 2)

    def indices_to_generator_input(self, indices: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input of scales 1..SN-1 (official ``idxBl_to_var_input``).

        Args:
            indices: LongTensor (B, nb, P).

        Returns:
            (B, P - 1, nb·Z), branch 0 channels first.
        """
        offs = self.quantizes[0].offsets
        b, z, k = indices.shape[0], self.cfg.code_dim, self.cfg.latent_size
        fhat = indices.new_zeros((b, self.cfg.num_branches * z, k, k), dtype=self.quantizes[0].embedding.weight.dtype)
        inputs = []
        for si in range(len(self.cfg.scales) - 1):
            tokens = indices[:, :, offs[si] : offs[si + 1]].transpose(1, 2)  # (B, q, nb)
            fhat = fhat + self.embed_scale(tokens, si)
            inputs.append(self.next_scale_input(fhat, si + 1))  # (B, pn_next², nb·Z)
        return torch.cat(inputs, dim=1)

    # ----- training

    @torch.no_grad()
    def _teacher_cls(self, img: torch.Tensor) -> torch.Tensor:
        mean = img.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = img.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self.semantic_model((img * 0.5 + 0.5 - mean) / std)[:, 0]  # (B, W)

    def teacher_features(self, img: torch.Tensor) -> torch.Tensor:
        """Semantic-loss target: teacher cls of img (B, 3, H, W) in [-1, 1], projected by quant_conv: (B, Z).

        The projection is the tokenizer's own ``quant_conv`` and is trained by the semantic loss.
        """
        return self._project(self._teacher_cls(img))

    def forward(
        self, img: torch.Tensor, keep_scales: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Training pass.

        Args:
            img: (B, 3, H, W) in [-1, 1].
            keep_scales: LongTensor (B,) of scales kept per sample (quantizer dropout), or None for all.

        Returns:
            The reconstruction (B, 3, H, W), not clamped; the VQ losses ``codebook`` and ``commit``
            averaged over the branches; and the straight-through f̂ of the semantic (last) branch
            (B, Z, K, K).
        """
        outs = [q(f, keep_scales) for q, f in zip(self.quantizes, self.encode(img), strict=True)]
        recon = self._decode(torch.cat([o[0] for o in outs], dim=1))
        losses = {
            "codebook": torch.stack([o[1] for o in outs]).mean(),
            "commit": torch.stack([o[2] for o in outs]).mean(),
        }
        return recon, losses, outs[-1][0]
