"""Vision Transformer pieces of the tokenizer (the DINOv2-style ViT-B that the official encoder,
decoder and semantic teacher are built from).

Attribute names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``ls1.gamma``, ``mlp.fc1`` ...) so that the official checkpoints load with ``strict=True``.
Attention is written as explicit matmul + softmax: it exports to ONNX opset 17 as plain
MatMul/Softmax, which every TensorRT version parses.

Shape letters: B batch, L tokens, W width, H heads, D head dim, G patches per side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # DINOv2 LayerNorm epsilon
LAYER_SCALE_INIT = 1e-5  # DINOv2 LayerScale init


def resample_grid_pos_embed(pos_embed_grid: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resample grid position embeddings (1, G², W) to (1, new_size², W).

    Bicubic with ``antialias=True`` in float32, as timm's ``resample_abs_pos_embed`` (the cls entry is
    not part of the input). The official tokenizer places its latent tokens on this resampled grid.
    """
    _, n, width = pos_embed_grid.shape
    old = math.isqrt(n)
    if old == new_size:
        return pos_embed_grid
    grid = pos_embed_grid.float().reshape(1, old, old, width).permute(0, 3, 1, 2)  # (1, W, G, G)
    grid = F.interpolate(grid, size=(new_size, new_size), mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_size * new_size, width).to(pos_embed_grid.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with one strided conv."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        # img (B, 3, H, W) -> (B, G², W)
        return self.proj(img).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention without a mask (the tokenizer attends bidirectionally)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # B, L, W -> H heads of D
        # -1 for the batch: the ONNX tracer would otherwise bake the example's batch size into Reshape.
        _, n, w = x.shape
        qkv = self.qkv(x).view(-1, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, L, L)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, w)  # (B, L, W)
        return self.proj(out)


class Mlp(nn.Module):
    """Two linear layers with exact (erf) GELU."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch."""

    def __init__(self, width: int, init: float = LAYER_SCALE_INIT) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.ls2 = LayerScale(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, L, W)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """The ViT trunk: cls token, absolute position embeddings (cls + G² grid), blocks, final norm.

    ``patch_embed`` exists only when ``patch_size`` is given (the official decoder has none).
    There is no head: the tokenizer reads the normalised token sequence.
    """

    def __init__(
        self, width: int, depth: int, heads: int, mlp_ratio: float, grid: int, patch_size: int | None = None
    ) -> None:
        super().__init__()
        self.grid = grid
        self.cls_token = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid + 1, width))
        if patch_size is not None:
            self.patch_embed = PatchEmbed(patch_size, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def grid_pos_embed(self) -> torch.Tensor:
        """Position embeddings of the G×G grid, without the cls entry: (1, G², W)."""
        return self.pos_embed[:, 1:]

    def prepend_cls(self, x: torch.Tensor, grid_pos: torch.Tensor) -> torch.Tensor:
        """Add ``grid_pos`` (1, L, W) to x (B, L, W) and prepend the cls token at its own position."""
        # Broadcast against x rather than expand(x.shape[0]): the ONNX tracer can freeze a size read
        # from a shape into a constant, and the batch must stay dynamic in the exported graphs.
        cls = self.cls_token + self.pos_embed[:, :1] + x[:, :1] * 0  # (B, 1, W)
        return torch.cat([cls, x + grid_pos], dim=1)  # (B, 1 + L, W)

    def embed_image(self, img: torch.Tensor) -> torch.Tensor:
        """Patch-embed an image and add positions: (B, 3, H, W) -> (B, 1 + G², W)."""
        return self.prepend_cls(self.patch_embed(img), self.grid_pos_embed())

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """All blocks, then the final LayerNorm: (B, L, W) -> (B, L, W)."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Image to normalised token sequence (B, 1 + G², W); token 0 is the cls token."""
        return self.run_blocks(self.embed_image(img))
