"""The torch module exported as the ``sampler`` graph: CFG mix, top-k/top-p, inverse-CDF draw in token-id order.

The algorithm and its numpy reference are in ``imagefolder/core/sampler.py``; this module mirrors it
step by step with operators TensorRT 10.3 parses at opset 17: TopK with the constant K =
``candidates`` (below TensorRT's limit of 3840), Softmax, MatMul with constant triangular matrices
for the cumulative sums (``BlockedCumsum``), ScatterElements, Where, ReduceMax, ArgMax. No CumSum
(TensorRT 10.3 turns it into a loop), no Multinomial, Sort, Loop or If. The uniforms are an input,
one per token, so the graph is deterministic and the runtime owns the random stream. The reference
tokens and the force mask are inputs too (schema 5): one Where picks the reference token where the
mask is set, so conditioned and unconditioned images share one graph, one batch and one CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagefolder.core.sampler import U_MAX, cumsum_block


class BlockedCumsum(nn.Module):
    """Inclusive cumulative sum over the last axis (of a fixed ``length``) as two small matrix products.

    The row is padded to ``blocks × block`` and viewed as (blocks, block): a product with an upper
    triangular ``block × block`` matrix of ones gives each block's prefix sums, a product with a
    strictly upper triangular ``blocks × blocks`` matrix gives each block's offset (the sum of the
    blocks before it). Cost per row: length · (block + blocks) multiply-adds, about 2·length^1.5.
    """

    def __init__(self, length: int):
        super().__init__()
        self.length, self.block = length, cumsum_block(length)
        self.blocks = math.ceil(length / self.block)
        self.register_buffer("within", torch.ones(self.block, self.block).triu(), persistent=False)
        self.register_buffer("before", torch.ones(self.blocks, self.blocks).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        padded = F.pad(x, (0, self.blocks * self.block - self.length))
        rows = padded.reshape(-1, self.blocks, self.block)  # (R, blocks, block)
        prefix = rows @ self.within  # (R, blocks, block): sums within each block
        offsets = prefix[..., -1] @ self.before  # (R, blocks): sums of the blocks before
        total = (prefix + offsets.unsqueeze(-1)).reshape(-1, self.blocks * self.block)
        return total[:, : self.length].reshape(*lead, self.length)


class SamplerGraph(nn.Module):
    """(logits, guidance, top_k, top_p, uniforms, reference_tokens, force_mask) → tokens.

    See ``imagefolder/core/sampler.py`` for the algorithm.

    Args:
        candidates: Kc, the tokens per branch kept by TopK before top-k/top-p (≤ V).
        codebook_size: V, tokens per branch.
        num_branches: branches whose logits are concatenated along the last axis (2 in ImageFolder).
    """

    def __init__(self, candidates: int, codebook_size: int, num_branches: int = 2):
        super().__init__()
        if not 1 <= candidates <= codebook_size:
            raise ValueError(f"candidates must be in [1, {codebook_size}], got {candidates}")
        self.candidates, self.codebook_size, self.num_branches = candidates, codebook_size, num_branches
        self.rank_cumsum = BlockedCumsum(candidates)
        self.token_cumsum = BlockedCumsum(codebook_size)
        self.register_buffer("ranks", torch.arange(candidates), persistent=False)

    def forward(
        self,
        logits: torch.Tensor,
        guidance: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        uniforms: torch.Tensor,
        reference_tokens: torch.Tensor,
        force_mask: torch.Tensor,
    ) -> torch.Tensor:
        # logits (N, q, nb·V) fp32; per image: guidance (B,) fp32, top_k (B,) int64, top_p (B,) fp32;
        # uniforms (B, q, nb); reference_tokens (B, q, nb) int32; force_mask (B, q, nb) bool
        split = logits.unflatten(-1, (self.num_branches, self.codebook_size))  # (N, q, nb, V)
        cond, uncond = split.chunk(2, dim=0)  # (B, q, nb, V) each
        guidance, top_k, top_p = (x.reshape(-1, 1, 1, 1) for x in (guidance, top_k, top_p))  # broadcast per image
        mixed = (1.0 + guidance) * cond - guidance * uncond
        vals, idx = torch.topk(mixed, self.candidates, dim=-1, largest=True, sorted=True)  # (B, q, nb, Kc)

        keep_k = (self.ranks < top_k) | (self.ranks == 0)  # (B, 1, 1, Kc): rank < clip(top_k, 1, Kc)
        probs = torch.softmax(torch.where(keep_k, vals, float("-inf")), dim=-1)
        before = self.rank_cumsum(probs) - probs  # mass of the higher-ranked candidates
        keep = keep_k & ((before < top_p) | (top_p >= 1.0))
        kept = torch.where(keep, probs, 0.0)

        dense = torch.zeros_like(mixed).scatter(-1, idx, kept)  # kept probabilities in token-id order
        cdf = self.token_cumsum(dense)
        kept_tokens = dense > 0
        total = torch.where(kept_tokens, cdf, 0.0).amax(dim=-1, keepdim=True)
        target = uniforms.clamp(0.0, float(U_MAX)).unsqueeze(-1) * total
        hit = kept_tokens & (cdf > target)
        drawn = torch.argmax(hit.float(), dim=-1).to(torch.int32)  # the first kept token past u · total
        return torch.where(force_mask, reference_tokens.to(torch.int32), drawn)  # teacher forcing
