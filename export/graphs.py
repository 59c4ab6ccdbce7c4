"""Wrapper modules that give each exported graph the I/O of its ``export.specs`` entry.

Each wrapper calls the same model methods as the PyTorch reference loop, casts hidden-state I/O to
the bundle's state dtype, and keeps everything TensorRT cannot parse out of the graph: the
antialiased resampling of the latent position embeddings is computed once here and stored as a
constant, and the fold's scale-dependent resampling and φ choice become gathers from stacked
constant matrices.

Shape legend: B images, N = 2B rows, q / q_next positions of this / the next scale, K latent side,
Z code dim per branch, nb branches, P positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from imagefolder.models.generator import Generator
from imagefolder.models.pruning import ScaleStep
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.resample import area_matrix, bicubic_matrix


class EncoderGraph(nn.Module):
    """image (B, 3, H, W) float32 → indices (B, nb, P) int32."""

    def __init__(self, tokenizer: Tokenizer, compute_dtype: torch.dtype):
        super().__init__()
        self.tokenizer, self.compute_dtype = tokenizer, compute_dtype
        with torch.no_grad():
            self.register_buffer("latent_pos", tokenizer.encoder.latent_pos().to(compute_dtype))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.img_to_indices(image.to(self.compute_dtype), self.latent_pos).to(torch.int32)


class DecoderGraph(nn.Module):
    """indices (B, nb, P) int32 → image (B, 3, H, W) float32 in [-1, 1]."""

    def __init__(self, tokenizer: Tokenizer, compute_dtype: torch.dtype):
        super().__init__()
        self.tokenizer, self.compute_dtype = tokenizer, compute_dtype
        with torch.no_grad():
            self.register_buffer("latent_pos", tokenizer.decoder.latent_pos().to(compute_dtype))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.indices_to_img(indices.long(), self.latent_pos).float()


class PrefillGraph(nn.Module):
    """labels (N,) → cond_start (N, 1, C), cond_blocks (N, L, 6, C), cond_head (N, 2, C).

    Holds only what the conditioning reads (class embedding, start position, every AdaLN linear):
    the trunk lives in the step graph alone, so no weight is stored twice.
    """

    def __init__(self, generator: Generator, state_dtype: torch.dtype):
        super().__init__()
        self.generator, self.state_dtype = generator, state_dtype

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_as(t, self.state_dtype) for t in self.generator.prefill(labels))


class StepGraph(nn.Module):
    """One scale (0 included) with the explicit cache, one input per layer (keys of every layer, then
    values: ``core.specs.cache_input_names``); see ``Generator.step``."""

    def __init__(self, generator: Generator, compute_dtype: torch.dtype, state_dtype: torch.dtype):
        super().__init__()
        self.generator, self.compute_dtype, self.state_dtype = generator, compute_dtype, state_dtype

    def forward(self, x_folded, positions, cond_start, cond_blocks, cond_head, *cache):
        cd, sd, depth = self.compute_dtype, self.state_dtype, self.generator.cfg.depth
        x_folded, cond_start, cond_blocks, cond_head = (
            _as(t, cd) for t in (x_folded, cond_start, cond_blocks, cond_head)
        )
        layers = [_as(t, cd) for t in cache]
        logits, keys, values = self.generator.step(
            x_folded, positions, cond_start, cond_blocks, cond_head, layers[:depth], layers[depth:]
        )
        return logits, _as(keys, sd), _as(values, sd)


class ScaleStepGraph(nn.Module):
    """The step graph of one scale of a pruned bundle (``ar_step_s{si}``): ``StepGraph``'s inputs, then
    ``prev_hidden`` where the scale is pruned; ``StepGraph``'s outputs, then ``hidden``. See ``models/pruning.py``."""

    def __init__(self, step: ScaleStep, compute_dtype: torch.dtype, state_dtype: torch.dtype):
        super().__init__()
        self.step, self.compute_dtype, self.state_dtype = step, compute_dtype, state_dtype

    def forward(self, x_folded, positions, cond_start, cond_blocks, cond_head, *rest):
        cd, sd, depth = self.compute_dtype, self.state_dtype, self.step.generator.cfg.depth
        x_folded, cond_start, cond_blocks, cond_head = (
            _as(t, cd) for t in (x_folded, cond_start, cond_blocks, cond_head)
        )
        layers = [_as(t, cd) for t in rest[: 2 * depth]]
        prev_hidden = _as(rest[2 * depth], cd) if len(rest) > 2 * depth else None
        logits, keys, values, hidden = self.step(
            x_folded, positions, cond_start, cond_blocks, cond_head, layers[:depth], layers[depth:], prev_hidden
        )
        return logits, _as(keys, sd), _as(values, sd), _as(hidden, sd)


class FusableTanhGelu(nn.Module):
    """``nn.GELU(approximate="tanh")`` written in the operator order ONNX Runtime fuses into one FastGelu.

    The exporter traces the built-in as 0.5·(x·(1 + tanh(c·(x + 0.044715·x·x·x)))), which matches no
    ORT fusion: eight element-wise passes over the (N, q, 4·width) hidden layer of every block.
    (x·0.5)·(1 + tanh(c·(x + 0.044715·x³))) is the same function and becomes one kernel
    (d17 step[9]: 1.26 → 0.47 ms a layer). TensorRT parses both forms.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return (x * 0.5) * (1.0 + torch.tanh(inner))


def with_fusable_gelu(generator: Generator) -> Generator:
    """``generator`` (an export copy, changed in place) with every tanh GELU in ``FusableTanhGelu``'s form."""
    for module in list(generator.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.GELU) and child.approximate == "tanh":
                setattr(module, name, FusableTanhGelu())
    return generator


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, without the Cast a same-type ``.to`` still puts in the traced graph (a copy
    of this scale's keys and values, 3 ms a step at d17 on ONNX Runtime)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class FoldGraph(nn.Module):
    """tokens of scale si + f̂ → updated f̂ and the next scale's folded input for both CFG halves.

    Computes in float32 whatever the bundle dtype: it is a few small matmuls, and f̂ accumulates
    ten scales. The scale enters as data (``scale_index``), so one graph serves every scale:
    per-scale upsampling matrices are stacked into (SN, K², max q) and zero-padded, the area
    downsampling matrices into (SN, max q, K²), and all φ convs run and the right one is gathered.
    """

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        cfg = tokenizer.cfg
        self.cfg = cfg
        scales, k = cfg.scales, cfg.latent_size
        max_q = max(pn * pn for pn in scales)
        up = torch.zeros(len(scales), k * k, max_q)
        down = torch.zeros(len(scales), max_q, k * k)
        for si, pn in enumerate(scales):
            up[si, :, : pn * pn] = bicubic_matrix(pn, k).float()
            down[si, : pn * pn] = area_matrix(k, pn).float()
        self.register_buffer("up", up)
        self.register_buffer("down", down)
        self.register_buffer("phi_of_scale", torch.tensor(cfg.phi_index, dtype=torch.int64))
        self.codebooks = nn.ParameterList(q.embedding.weight.detach().float().clone() for q in tokenizer.quantizes)
        self.phis = nn.ModuleList(q.quant_resi for q in tokenizer.quantizes)

    def forward(self, tokens, f_hat, scale_index, next_positions):
        b, q, _ = tokens.shape
        k, z = self.cfg.latent_size, self.cfg.code_dim
        up = self.up.index_select(0, scale_index)[0, :, :q]  # (K², q)
        phi_k = self.phi_of_scale.index_select(0, scale_index)  # (1,)
        parts = []
        for branch, (codebook, phi) in enumerate(zip(self.codebooks, self.phis, strict=True)):
            e = codebook.index_select(0, tokens[..., branch].reshape(-1).long()).view(b, q, z)  # (B, q, Z)
            h = (e.transpose(1, 2) @ up.T).view(b, z, k, k)  # (B, Z, K, K)
            refined = torch.stack([phi(h, i) for i in range(len(phi.qresi_ls))])  # (num_phi, B, Z, K, K)
            parts.append(refined.index_select(0, phi_k)[0])
        f_out = f_hat.float() + torch.cat(parts, dim=1)  # (B, nb·Z, K, K)
        q_next = next_positions.shape[0]
        next_index = (scale_index + 1).clamp_max(len(self.cfg.scales) - 1)
        down = self.down.index_select(0, next_index)[0, :q_next]  # (q_next, K²)
        x_next = (f_out.flatten(2) @ down.T).transpose(1, 2)  # (B, q_next, nb·Z)
        return f_out.to(f_hat.dtype), x_next.repeat(2, 1, 1).to(f_hat.dtype)
