"""The torch module exported as the ``sampler`` graph: CFG mix, top-k/top-p, Gumbel-max.

The algorithm and its numpy reference are in ``imagefolder/core/sampler.py``; this module mirrors it line
by line with operators TensorRT parses at opset 17: TopK with the constant K = ``candidates``
(below TensorRT's limit of 3840), Softmax, CumSum on a constant axis, Where, Log, ArgMax and
GatherElements. No Multinomial (unsupported), no Sort, no If. The uniform noise is an input, so the
graph is deterministic and the runtime owns the random stream.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from imagefolder.core.sampler import U_MAX, U_MIN


class SamplerGraph(nn.Module):
    """(logits, guidance, top_k, top_p, noise) → tokens; see ``imagefolder/core/sampler.py`` for the algorithm.

    Args:
        candidates: Kc, the tokens per branch kept by TopK before top-k/top-p (≤ V).
        num_branches: branches whose logits are concatenated along the last axis (2 in ImageFolder).
    """

    def __init__(self, candidates: int, num_branches: int = 2):
        super().__init__()
        if candidates < 1:
            raise ValueError(f"candidates must be ≥ 1, got {candidates}")
        self.candidates = candidates
        self.num_branches = num_branches
        self.register_buffer("ranks", torch.arange(candidates), persistent=False)

    def forward(
        self,
        logits: torch.Tensor,
        guidance: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        # logits (N, q, nb·V) fp32, guidance (1,) fp32, top_k (1,) int64, top_p (1,) fp32, noise (B, q, nb, V)
        split = logits.unflatten(-1, (self.num_branches, -1))  # (N, q, nb, V)
        cond, uncond = split.chunk(2, dim=0)  # (B, q, nb, V) each
        mixed = (1.0 + guidance) * cond - guidance * uncond  # (B, q, nb, V)
        vals, idx = torch.topk(mixed, self.candidates, dim=-1, largest=True, sorted=True)  # (B, q, nb, Kc)

        keep_k = (self.ranks < top_k) | (self.ranks == 0)  # (Kc,) rank < clip(top_k, 1, Kc)
        masked = torch.where(keep_k, vals, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the higher-ranked candidates
        keep = keep_k & ((before < top_p) | (top_p >= 1.0))

        u = torch.gather(noise, -1, idx)  # (B, q, nb, Kc): noise by token id, so rank swaps change nothing
        gumbel = -torch.log(-torch.log(u.clamp(float(U_MIN), float(U_MAX))))
        score = torch.where(keep, masked, float("-inf")) + gumbel
        choice = torch.argmax(score, dim=-1, keepdim=True)  # (B, q, nb, 1), first maximum
        return torch.gather(idx, -1, choice).squeeze(-1).to(torch.int32)  # (B, q, nb)
