"""The ImageFolder generator: next-scale prediction (VAR, Tian et al. 2024) with folded tokens.

Each position of the multi-scale sequence carries two tokens (one per product-quantizer branch):
the input folds the two branches' 32-channel features into one 64-d vector (``word_embed``), and
the output is one head of 2V logits whose halves are two independent categoricals.

Attribute names reproduce the official ``VAR`` keys so official checkpoints load strictly. Unlike
the official code, no module holds a KV cache: ``prefill`` and ``step`` take the cache as an
argument and return this scale's keys and values, the same contract as the exported graphs.

Shape legend: B images, N rows (2B under CFG), q positions of one scale, P positions in all, C width,
L depth, H heads, D head dim, V codebook size per branch, Z code dim per branch (2Z folded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagefolder.configs import GeneratorConfig

# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q/k and a learned per-head temperature.

    The softmax scale is 1: q and k are unit vectors and q is multiplied by
    ``exp(min(scale_mul_1H11, ln 100))`` (initialised at ln 4), as in the official model.
    """

    def __init__(self, width: int, heads: int, scale_max: float = math.log(100.0)):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale_max = scale_max
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, q, C) → q scaled, k normalised, v: each (N, H, q, D)."""
        n, length, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(n, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, q, D)
        temperature = self.scale_mul_1H11.clamp_max(self.scale_max).exp()
        q = F.normalize(q, dim=-1) * temperature
        k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend x (N, q, C) to itself, and to ``past = (keys, values, past_bias)`` when given.

        ``attn_bias`` (1, 1, q, q) is the additive block-causal mask of teacher forcing. ``past``
        holds (N, H, P, D) keys and values and a (P,) additive mask: 0 at the filled cache entries,
        −inf elsewhere (an Add per layer; a Where with a −inf tensor cost ONNX Runtime 5× as much).
        Returns the output (N, q, C) and this call's keys and values (N, H, q, D).
        """
        n, length, c = x.shape
        q, k, v = self.qkv(x)
        scores = q @ k.transpose(-2, -1)  # (N, H, q, q)
        if attn_bias is not None:
            scores = scores + attn_bias
        if past is not None:
            past_k, past_v, past_bias = past
            past_scores = q @ past_k.transpose(-2, -1) + past_bias  # (N, H, q, P)
            scores = torch.cat([past_scores, scores], dim=-1)  # (N, H, q, P+q)
            values = torch.cat([past_v, v], dim=-2)  # (N, H, P+q, D)
        else:
            values = v
        out = scores.softmax(dim=-1) @ values  # (N, H, q, D)
        out = out.transpose(1, 2).reshape(n, length, c)
        return self.proj(out), k, v


# ---------------------------------------------------------------------------------------------
# AdaLN blocks
# ---------------------------------------------------------------------------------------------


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorms are modulated by the class condition (AdaLN).

    ``ada_lin(cond)`` gives six vectors in the official order γ1, γ2, scale1, scale2, shift1, shift2.
    The modulation depends only on the label, so ``modulation`` is computed once per image and
    ``forward`` takes it precomputed (the exported step graph carries no AdaLN weights).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, drop_path: float):
        super().__init__()
        self.width = width
        self.attn = SelfAttention(width, heads)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.drop_path = DropPath(drop_path)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(N, C) class embedding → (N, 6, C) γ1, γ2, scale1, scale2, shift1, shift2."""
        return self.ada_lin(cond).view(-1, 6, self.width)

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, q, C), mod (N, 6, C) → x (N, q, C), keys and values (N, H, q, D)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unsqueeze(1).unbind(2)  # each (N, 1, C)
        h = self.ln_wo_grad(x) * (scale1 + 1) + shift1
        h, k, v = self.attn(h, attn_bias, past)
        x = x + self.drop_path(h * gamma1)
        h = self.ln_wo_grad(x) * (scale2 + 1) + shift2
        x = x + self.drop_path(self.ffn(h) * gamma2)
        return x, k, v


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(N, C) → (N, 2, C) scale, shift."""
        return self.ada_lin(cond).view(-1, 2, self.width)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        scale, shift = mod.unsqueeze(1).unbind(2)  # each (N, 1, C)
        return self.ln_wo_grad(x) * (scale + 1) + shift


# ---------------------------------------------------------------------------------------------
# KV cache (owned by the caller)
# ---------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of every filled position, preallocated for all P positions.

    (L, N, H, P, D), the layout of the runtimes' cache buffers, whose layers the exported ``ar_step``
    takes as ``past_keys_{l}`` / ``past_values_{l}``.
    ``length`` is the fill position: entries at or after it are ignored by attention.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, cfg: GeneratorConfig, rows: int, dtype: torch.dtype = torch.float32, device=None) -> KVCache:
        shape = (cfg.depth, rows, cfg.heads, cfg.positions, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one scale's (L, N, H, q, D) keys and values at the fill position."""
        q = keys.shape[3]
        self.keys[:, :, :, self.length : self.length + q] = keys
        self.values[:, :, :, self.length : self.length + q] = values
        self.length += q


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def scale_levels(scales: tuple[int, ...]) -> torch.Tensor:
    """(P,) int64 scale index of every position."""
    return torch.tensor([si for si, pn in enumerate(scales) for _ in range(pn * pn)], dtype=torch.int64)


def block_causal_bias(scales: tuple[int, ...]) -> torch.Tensor:
    """(1, 1, P, P) additive mask: position i sees j iff scale(j) ≤ scale(i)."""
    level = scale_levels(scales)
    allowed = level.view(-1, 1) >= level.view(1, -1)
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    return bias.view(1, 1, *allowed.shape)


class Generator(nn.Module):
    """VAR with folded product-quantized tokens (official ``VAR``, ``shared_aln=False``)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        c, positions = cfg.width, cfg.positions
        init_std = math.sqrt(1 / c / 3)
        # Registration order reproduces the official state_dict order.
        self.pos_start = nn.Parameter(torch.empty(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, positions, c))
        self.word_embed = nn.Linear(cfg.folded_dim, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # row num_classes is the null class
        self.lvl_embed = nn.Embedding(len(cfg.scales), c)
        self.register_buffer("lvl_1L", scale_levels(cfg.scales).view(1, positions))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(cfg.scales))
        drop_rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(c, cfg.heads, cfg.mlp_ratio, cfg.norm_eps, drop_rates[i]) for i in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, 2 * cfg.codebook_size)
        for tensor in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(tensor, std=init_std)
        self._init_weights()

    def _init_weights(self, gamma_init: float = 1e-4) -> None:
        """Official-style init: small AdaLN γ so each block starts near the identity."""
        for block in self.blocks:
            ada = block.ada_lin[-1]
            nn.init.zeros_(ada.bias)
            nn.init.trunc_normal_(ada.weight, std=0.02)
            ada.weight.data[: 2 * self.cfg.width].mul_(gamma_init)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    # -- conditioning ---------------------------------------------------------------------------

    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """labels (N,) → sos (N, C), block modulation (N, L, 6, C), head modulation (N, 2, C)."""
        sos = self.class_emb(labels)
        cond_blocks = torch.stack([block.modulation(sos) for block in self.blocks], dim=1)
        return sos, cond_blocks, self.head_nm.modulation(sos)

    def logits(self, x: torch.Tensor, cond_head: torch.Tensor) -> torch.Tensor:
        """(N, q, C) → (N, q, 2V) in fp32: first half branch 0 (detail), second half branch 1."""
        return self.head(self.head_nm(x, cond_head)).float()

    def _trunk(self, x, cond_blocks, attn_bias=None, past=None):
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            block_past = None if past is None else (past[0][i], past[1][i], past[2])
            x, k, v = block(x, cond_blocks[:, i], attn_bias, block_past)
            keys.append(k)
            values.append(v)
        return x, torch.stack(keys), torch.stack(values)  # keys, values (L, N, H, q, D)

    # -- inference: prefill and step, the two exported graphs -----------------------------------

    def prefill(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-image conditioning, computed once: it depends on the label alone.

        Args:
            labels: (N,) int64 class ids; ``cfg.null_class`` is the unconditional row.
        Returns:
            cond_start (N, 1, C): the start token of scale 0 (class embedding + ``pos_start``);
            cond_blocks (N, L, 6, C) and cond_head (N, 2, C): the AdaLN modulation of every block and of the head.
        """
        sos, cond_blocks, cond_head = self.condition(labels)
        return sos.unsqueeze(1) + self.pos_start, cond_blocks, cond_head

    def step(
        self,
        x_folded: torch.Tensor,
        positions: torch.Tensor,
        cond_start: torch.Tensor,
        cond_blocks: torch.Tensor,
        cond_head: torch.Tensor,
        past_keys: torch.Tensor | Sequence[torch.Tensor],
        past_values: torch.Tensor | Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One scale, attending to the cache; the same computation serves every scale.

        Args:
            x_folded: (N, q, 2Z) folded input of this scale (area-downsampled running f̂); ignored at
                scale 0, whose input is the start token.
            positions: (q,) int64 global positions of this scale; cache entries before
                ``positions[0]`` are attended to, later ones are ignored (all of them at scale 0).
            cond_start, cond_blocks, cond_head: the conditioning returned by ``prefill``.
            past_keys, past_values: the cache, (L, N, H, P, D) or L layers of (N, H, P, D) (the exported
                graph's form: a runtime binds each layer of its buffer, and indexing a graph input
                would copy it).
        Returns:
            logits (N, q, 2V), and this scale's keys and values (L, N, H, q, D).
        """
        x = self.embed(x_folded, positions, cond_start)
        x, keys, values = self.attend(x, positions, cond_blocks, past_keys, past_values)
        return self.logits(x, cond_head), keys, values

    def embed(self, x_folded: torch.Tensor, positions: torch.Tensor, cond_start: torch.Tensor) -> torch.Tensor:
        """The trunk's input (N, q, C) of one scale: its folded input (scale 0: the start token) + position + level."""
        pos = self.pos_1LC[0].index_select(0, positions)  # (q, C)
        lvl = self.lvl_embed(self.lvl_1L[0].index_select(0, positions))  # (q, C)
        first = positions[:1] == 0  # scale 0: the start token instead of a folded input (a Where, no If)
        return torch.where(first, cond_start, self.word_embed(x_folded)) + pos + lvl  # (N, q, C)

    def attend(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cond_blocks: torch.Tensor,
        past_keys: torch.Tensor | Sequence[torch.Tensor],
        past_values: torch.Tensor | Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trunk on x (N, q, C) of one scale, attending to the cache entries before ``positions[0]``.

        Returns the trunk output (N, q, C) and this call's keys and values (L, N, H, q, D).
        """
        filled = torch.arange(past_keys[0].shape[2], device=positions.device) < positions[:1]  # (P,)
        past_bias = torch.zeros(filled.shape, dtype=x.dtype, device=x.device).masked_fill(~filled, float("-inf"))
        return self._trunk(x, cond_blocks, past=(past_keys, past_values, past_bias))

    # -- training: teacher forcing over all scales ----------------------------------------------

    def forward(self, labels: torch.Tensor, x_folded: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for every position.

        Args:
            labels: (B,) int64; in training mode replaced by the null class with prob. ``cond_drop``.
            x_folded: (B, P - 1, 2Z) inputs of scales 1.. (the tokenizer's ``indices_to_generator_input``).
        Returns:
            logits (B, P, 2V).
        """
        if self.training and self.cfg.cond_drop > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.cond_drop
            labels = torch.where(drop, torch.full_like(labels, self.cfg.null_class), labels)
        sos, cond_blocks, cond_head = self.condition(labels)
        x = torch.cat([sos.unsqueeze(1) + self.pos_start, self.word_embed(x_folded)], dim=1)  # (B, P, C)
        x = x + self.lvl_embed(self.lvl_1L) + self.pos_1LC
        positions = self.cfg.positions
        attn_bias = self.attn_bias_for_masking[:, :, :positions, :positions]
        x, _, _ = self._trunk(x, cond_blocks, attn_bias=attn_bias)
        return self.logits(x, cond_head)
