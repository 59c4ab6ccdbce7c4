"""Multi-scale residual vector quantizer: one product branch of the ImageFolder tokenizer.

Reproduces the official ``VectorQuantizer2`` (key names included): a codebook, partially shared
φ refinement convs, and a residual loop over the scales (VAR, arXiv 2404.02905, with the ImageFolder
quantizer dropout). Codes are chosen by cosine similarity but the raw codebook rows are added.

Deviation from the official code: the area downsampling and bicubic upsampling are constant matrices
(``imagefolder.resample``) instead of ``F.interpolate``, so the model exports to ONNX as MatMul only.
The results equal ``F.interpolate`` to float rounding.

Shape letters: B batch, Z code dim, K finest latent side, V codebook size, SN scales, pn side of one
scale, P tokens over all scales.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imagefolder.configs import TokenizerConfig
from imagefolder.core.schedule import num_positions, scale_spans
from imagefolder.resample import area_matrix, bicubic_matrix

HIT_EMA = 0.99  # decay of the codebook usage statistics (ema_vocab_hit_SV)


def sample_keep_scales(cfg: TokenizerConfig, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the quantizer-dropout scale counts for one batch: LongTensor (B,).

    The first ``floor(codebook_drop * B)`` samples keep a uniform number of scales in
    {start_drop, ..., SN}; every other sample keeps all SN scales (official rule).
    """
    num_scales = len(cfg.scales)
    keep = torch.full((batch_size,), num_scales, dtype=torch.long)
    dropped = int(cfg.codebook_drop * batch_size)
    keep[:dropped] = torch.randint(cfg.start_drop, num_scales + 1, (dropped,), generator=generator)
    return keep


class Phi(nn.Conv2d):
    """φ(h) = (1 - r)·h + r·conv3x3(h): the refinement applied to each scale's upsampled codes."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiPartiallyShared(nn.Module):
    """``num_phi`` φ convs shared among the scales; ``phi_index[si]`` picks the conv of scale si."""

    def __init__(self, dim: int, num_phi: int, ratio: float) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(num_phi))

    def forward(self, h: torch.Tensor, k: int) -> torch.Tensor:
        return self.qresi_ls[k](h)


class MultiScaleQuantizer(nn.Module):
    """One product branch: codebook (V, Z), φ convs, and the residual loop over the scales."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.scales = cfg.scales
        self.phi_index = cfg.phi_index
        self.beta = cfg.beta
        self.size = cfg.latent_size
        num_scales, vocab = len(cfg.scales), cfg.codebook_size
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(num_scales, vocab))
        self.quant_resi = PhiPartiallyShared(cfg.code_dim, cfg.num_phi, cfg.phi_ratio)
        self.embedding = nn.Embedding(vocab, cfg.code_dim)
        self._init_codebook()
        # Resampling matrices for every scale coarser than K: down (pn², K²), up (K², pn²).
        # Built on the CPU even when the model is built on the meta device: they are constants that no
        # checkpoint holds, and the resample module caches them.
        with torch.device("cpu"):
            for si, pn in enumerate(self.scales):
                if pn != self.size:
                    self.register_buffer(f"down{si}", area_matrix(self.size, pn).float(), persistent=False)
                    self.register_buffer(f"up{si}", bicubic_matrix(pn, self.size).float(), persistent=False)

    def _init_codebook(self) -> None:
        # Official init: uniform(±1/V), then every row L2-normalised.
        vocab = self.embedding.num_embeddings
        nn.init.uniform_(self.embedding.weight, -1 / vocab, 1 / vocab)
        with torch.no_grad():
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))

    @property
    def offsets(self) -> list[int]:
        """Start of each scale in the concatenated (P,) token sequence, plus P at the end."""
        return [start for start, _ in scale_spans(self.scales)] + [num_positions(self.scales)]

    def downsample(self, x: torch.Tensor, si: int) -> torch.Tensor:
        """Area-downsample (B, C, K, K) to scale si, flattened: (B, C, pn²)."""
        x = x.flatten(2)  # (B, C, K²)
        if self.scales[si] == self.size:
            return x
        return x @ getattr(self, f"down{si}").to(x.dtype).T  # (B, C, pn²)

    def upsample(self, h: torch.Tensor, si: int) -> torch.Tensor:
        """Bicubic-upsample flattened (B, C, pn²) of scale si to (B, C, K, K)."""
        if self.scales[si] != self.size:
            h = h @ getattr(self, f"up{si}").to(h.dtype).T  # (B, C, K²)
        return h.unflatten(2, (self.size, self.size))

    def embed_scale(self, idx: torch.Tensor, si: int) -> torch.Tensor:
        """Contribution of scale si to f̂: φ_k(bicubic_up(codebook[idx])) with k = phi_index[si].

        Args:
            idx: LongTensor (B, pn²), raster order.
            si: scale index.

        Returns:
            (B, Z, K, K)
        """
        h = self.embedding(idx).transpose(1, 2)  # (B, Z, pn²)
        return self.quant_resi(self.upsample(h, si), self.phi_index[si])

    def _nearest(self, r: torch.Tensor) -> torch.Tensor:
        # r (B, Z, pn²) -> code with the highest cosine similarity: (B, pn²)
        sim = F.normalize(r.transpose(1, 2), dim=-1) @ F.normalize(self.embedding.weight, dim=1).T  # (B, pn², V)
        return sim.argmax(dim=-1)

    def _walk(self, f: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The residual loop; yields (idx (B, pn²), h (B, Z, K, K)) per scale. The residual is always
        # updated, whichever scales a caller accumulates (quantizer dropout relies on it).
        rest = f.detach()
        for si in range(len(self.scales)):
            idx = self._nearest(self.downsample(rest, si))
            h = self.embed_scale(idx, si)
            rest = rest - h.detach()
            yield idx, h

    def f_to_indices(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Quantize f (B, Z, K, K) to one LongTensor (B, pn²) per scale, raster order."""
        return [idx for idx, _ in self._walk(f)]

    def f_to_fhat(self, f: torch.Tensor) -> torch.Tensor:
        """Quantize f (B, Z, K, K) and return the reconstruction f̂ (B, Z, K, K) over all scales."""
        fhat = torch.zeros_like(f)
        for _, h in self._walk(f):
            fhat = fhat + h
        return fhat

    def indices_to_fhat(self, indices: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Sum of the scales' contributions: indices as a list of (B, pn²) or one (B, P) -> (B, Z, K, K)."""
        if isinstance(indices, torch.Tensor):
            offs = self.offsets
            indices = [indices[:, offs[si] : offs[si + 1]] for si in range(len(self.scales))]
        fhat = self.embed_scale(indices[0], 0)
        for si in range(1, len(indices)):
            fhat = fhat + self.embed_scale(indices[si], si)
        return fhat

    def forward(
        self, f: torch.Tensor, keep_scales: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training pass with quantizer dropout.

        Args:
            f: encoder latent (B, Z, K, K).
            keep_scales: LongTensor (B,); sample b accumulates only scales si < keep_scales[b].
                None keeps every scale.

        Returns:
            f̂ with the straight-through gradient (B, Z, K, K), codebook loss, commitment loss,
            and the indices (one (B, pn²) per scale).
        """
        # B, Z, K; losses follow the lxa9867 code: codebook averaged over SN, commit = β·sum
        b, num_scales = f.shape[0], len(self.scales)
        if keep_scales is None:
            keep_scales = torch.full((b,), num_scales, dtype=torch.long, device=f.device)
        target = f.detach()
        fhat = torch.zeros_like(f)
        codebook_loss = f.new_zeros(())
        commit_loss = f.new_zeros(())
        indices = []
        for si, (idx, h) in enumerate(self._walk(f)):
            keep = (keep_scales > si).to(f.dtype)  # (B,)
            # The masked losses are renormalised by the kept fraction; an all-dropped scale adds 0.
            ratio = keep.mean().clamp_min(1.0 / b)
            mask = keep.view(b, 1, 1, 1)
            fhat = fhat + mask * h
            codebook_loss = codebook_loss + (mask * (fhat - target).square()).mean() / ratio
            commit_loss = commit_loss + (mask * (fhat.detach() - f).square()).mean() / ratio
            indices.append(idx)
            if self.training:
                self._record_hits(idx, si)
        fhat_st = f + (fhat - f).detach()  # value f̂, gradient to the encoder
        return fhat_st, codebook_loss / num_scales, self.beta * commit_loss, indices

    @torch.no_grad()
    def _record_hits(self, idx: torch.Tensor, si: int) -> None:
        hits = torch.bincount(idx.flatten(), minlength=self.embedding.num_embeddings).to(self.ema_vocab_hit_SV.dtype)
        self.ema_vocab_hit_SV[si].mul_(HIT_EMA).add_(hits, alpha=1 - HIT_EMA)
