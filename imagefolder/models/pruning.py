"""The step of one scale of a pruned bundle, in torch: exported as ``ar_step_s{si}`` and run by the torch backend.

What is kept, how positions are scored and what a pruned position gets are fixed in ``core/pruning.py``.
``ScaleStep`` holds the constant matrices of its scale (the score's low-pass, the upsampling of the previous
scale) and computes, for a pruned scale:

1. the trunk input of every position (``Generator.embed``) and the score of every position;
2. the kept positions: the top ``kept`` of the quantized score with raster-order tie-break (one TopK);
3. the trunk on the kept positions only, attending to the cache as the dense step does;
4. the full scale back: the previous scale's trunk output and cache entries upsampled, the kept positions'
   own written over them (ScatterElements); the head on every position.

A dense ``ScaleStep`` (the scale before a pruned one) is ``Generator.step`` that also returns its trunk output.
Shape legend as in ``models/generator.py``; k kept positions, q_prev the previous scale's positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from imagefolder.core.pruning import RANK_RANGE, kept_count
from imagefolder.models.generator import Generator
from imagefolder.resample import area_matrix, bicubic_matrix


class ScaleStep(nn.Module):
    """One scale's step with its trunk output; pruned to ``ratio`` of its positions unless ``ratio`` is None."""

    def __init__(self, generator: Generator, scale_index: int, ratio: float | None):
        super().__init__()
        scales = generator.cfg.scales
        self.generator, self.scale_index, self.ratio = generator, scale_index, ratio
        pn = scales[scale_index]
        self.q = pn * pn
        self.kept = self.q if ratio is None else kept_count(ratio, self.q)
        if ratio is not None:
            prev = scales[scale_index - 1]
            up = bicubic_matrix(prev, pn)  # (q, q_prev)
            self.prev_start = generator.cfg.scale_offsets[scale_index - 1]
            self.prev_q = prev * prev
            self.register_buffer("up", up.float(), persistent=False)
            self.register_buffer("low_pass", (up @ area_matrix(pn, prev)).float(), persistent=False)  # (q, q)
            # Raster-order tie-break: among equal levels the earlier position ranks higher.
            self.register_buffer("tie_break", torch.arange(self.q - 1, -1, -1, dtype=torch.float32), persistent=False)
            self.levels = float(RANK_RANGE // self.q - 1)

    def scores(self, x_folded: torch.Tensor) -> torch.Tensor:
        """(N, q, 2Z) → (N, q) rank keys: the score quantized to ``levels`` of its row maximum, then the tie-break."""
        x = x_folded.float()
        change = x - self.low_pass @ x  # (N, q, 2Z): what this scale adds over the previous grid
        score = change.square().sum(-1)  # (N, q)
        peak = score.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        level = torch.floor(score / peak * self.levels)  # integers 0..levels, exact in float32
        return level * self.q + self.tie_break

    def forward(
        self,
        x_folded: torch.Tensor,
        positions: torch.Tensor,
        cond_start: torch.Tensor,
        cond_blocks: torch.Tensor,
        cond_head: torch.Tensor,
        past_keys: Sequence[torch.Tensor],
        past_values: Sequence[torch.Tensor],
        prev_hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns logits (N, q, 2V), keys and values (L, N, H, q, D), the trunk output (N, q, C)."""
        gen = self.generator
        x = gen.embed(x_folded, positions, cond_start)  # (N, q, C)
        if self.ratio is None:
            hidden, keys, values = gen.attend(x, positions, cond_blocks, past_keys, past_values)
            return gen.logits(hidden, cond_head), keys, values, hidden
        if prev_hidden is None:
            raise ValueError(f"scale {self.scale_index} is pruned: it needs the previous scale's trunk output")
        kept = self.scores(x_folded).topk(self.kept, dim=1).indices  # (N, k)
        width = x.shape[-1]
        x_kept = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))  # (N, k, C)
        out, kept_keys, kept_values = gen.attend(x_kept, positions, cond_blocks, past_keys, past_values)
        up = self.up.to(x.dtype)
        restored = up @ prev_hidden.to(x.dtype)  # (N, q, C): the previous scale's output, upsampled
        hidden = restored.scatter(1, kept.unsqueeze(-1).expand(-1, -1, width), out)
        keys = self._restore_cache(past_keys, kept, kept_keys)
        values = self._restore_cache(past_values, kept, kept_values)
        return gen.logits(hidden, cond_head), keys, values, hidden

    def _restore_cache(self, cache: Sequence[torch.Tensor], kept: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """(L, N, H, q, D): the previous scale's entries of every layer upsampled, the kept positions' ``own``."""
        span = slice(self.prev_start, self.prev_start + self.prev_q)
        previous = torch.stack([layer[:, :, span] for layer in cache])  # (L, N, H, q_prev, D)
        full = self.up.to(own.dtype) @ previous  # (L, N, H, q, D)
        index = kept[None, :, None, :, None].expand(own.shape)  # (L, N, H, k, D)
        return full.scatter(3, index, own)
