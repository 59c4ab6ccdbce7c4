"""What each graph of a generation computes and reads, from the model configuration alone.

The floor of a stage (``bench.calibrate``) is max(FLOPs / GEMM rate, bytes read / memory rate); this
module gives its two numerators. Every stage is described by its matrix products (``Gemm``: the
linear layers, the attention products, the convolutions as im2col products, the sampler's blocked
cumulative sums, the resampling matrices) and by the bytes it must read: the weights it touches and
its inputs. Element-wise work (norms, softmax, GELU, TopK, gathers) is not counted as FLOPs; it is
memory traffic on tensors no larger than the inputs counted. ``tests/test_bench_cost.py`` checks
every formula on the tiny configuration against a direct count: ``torch.utils.flop_counter`` on the
exported modules, and the parameters each module actually reads, traced op by op.

Symbols: B images, N = 2B rows (classifier-free guidance), C width, L depth, H heads, F = round(C·r)
the FFN width, V codebook size per branch, nb branches, Z code dim (nb·Z the folded input), P
positions over all scales, q (q') positions of this (the next) scale, K the finest latent side,
φ the refinement convs per branch (φ_u of them used by some scale), Kc the sampler's candidates;
tokenizer: W width, Ld depth, Hd heads, Fd = ⌊W·r⌋, G patches per side, p patch size, T = G² + K² + 2
decoder tokens. s is the bytes of a weight (4 fp32, 2 fp16/bf16), s' of a hidden state at the graph
boundary (4 fp32/bf16, 2 fp16); fold and sampler compute in fp32 whatever the bundle dtype.

FLOPs (2 per multiply-add):

    prefill   2N·C·(6C·L + 2C)                                   AdaLN linears of L blocks and the head
    step      2Nq·(nb·Z·C + L·(4C² + 2C·F) + C·nb·V)             word_embed, qkv, proj, fc1, fc2, head
              + 4L·Nq·(P + q)·C                                  q·kᵀ and softmax·v over cache + scale
    sample    B·q·nb·(c(Kc) + c(V)),  c(n) = 2(n_b·b² + n_b²)    two blocked cumsums, b = cumsum_block(n), n_b = ⌈n/b⌉
    fold      nb·B·(2Z·q·K² + φ·18Z²·K²) + 2B·nb·Z·K²·q'         upsample, every φ conv, area-downsample
    decode    nb·B·Σ_s (2Z·q_s·K²·[pn_s ≠ K] + 18Z²·K²)          f̂ from the indices (as in fold)
              + 2B·K²·nb·Z·W + 2B·G²·W·3p²                       post_quant_conv, pixel head
              + Ld·(2BT·(4W² + 2W·Fd) + 4B·T²·W)                 the ViT decoder

Bytes read = weights touched + the graph's inputs. Weights touched (gathered tables by the rows read;
integer index tables not counted):

    prefill   s·((B + 1)·C + C + L·(6C² + 6C) + 2C² + 2C)
              (B labels and the null class of class_emb, pos_start, the AdaLN linears)
    step      s·(nb·Z·C + C + L·(4C² + 2C·F + 5C + F + H) + C·nb·V + nb·V + q·C + C)
              (word_embed; per block qkv and its 3 biases, proj, fc1, fc2, the head temperatures;
              the head; q rows of pos_1LC and one level row)
    sample    4·(b_Kc² + n_b,Kc² + b_V² + n_b,V²)   (the triangular matrices)
    fold      4·(2K²·max_s q_s + nb·(min(Bq, V)·Z + φ·(9Z² + Z)))
              (one slice of the stacked up and down matrices, the codebook rows, every φ)
    decode    s·(nb·(min(BP, V)·Z + Σ_{pn_s ≠ K} q_s·K² + φ_u·(9Z² + Z)) + nb·Z·W + W + K²·W
              + Ld·(4W² + 2W·Fd + 11W + Fd) + (G² + 1)·W + 6W + 3p²·W + 3p²)
              (codebook rows, upsampling matrices, the φ used; post_quant_conv, latent positions;
              the ViT blocks, positions, cls, mask token, level rows, final norm; the pixel head)

Inputs: step reads the whole cache, 2L·N·P·C·s' (masked, not sliced), the conditioning
N·(L·6 + 3)·C·s' and x (N·q·nb·Z·s'); the sampler its logits 4·N·q·nb·V; the others little.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from imagefolder.configs import ModelConfig
from imagefolder.core.sampler import cumsum_block

WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
STATE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 4}  # bf16 bundles keep an fp32 boundary (core.specs.state_dtype)
INDEX, TOKEN = 8, 4  # int64 positions and labels, int32 tokens and indices


@dataclass(frozen=True)
class Gemm:
    """``batch`` independent products (m, k) @ (k, n), ``count`` times (one per block, say)."""

    m: int
    k: int
    n: int
    batch: int = 1
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n * self.count

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(batch, m, k, n): what the calibration times."""
        return self.batch, self.m, self.k, self.n


@dataclass(frozen=True)
class StageCost:
    """The matrix products of one stage and the bytes it reads."""

    gemms: tuple[Gemm, ...]
    weight_bytes: int
    input_bytes: int

    @property
    def flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    @property
    def bytes_read(self) -> int:
        return self.weight_bytes + self.input_bytes


def _ffn_width(width: int, ratio: float) -> int:
    return round(width * ratio)


# ---------------------------------------------------------------------------------------------
# The generator's graphs
# ---------------------------------------------------------------------------------------------


def prefill_cost(config: ModelConfig, batch: int, dtype: str = "fp32") -> StageCost:
    g = config.generator
    c, n, s = g.width, 2 * batch, WEIGHT_BYTES[dtype]
    gemms = (Gemm(n, c, 6 * c, count=g.depth), Gemm(n, c, 2 * c))
    weights = s * ((batch + 1) * c + c + g.depth * (6 * c * c + 6 * c) + 2 * c * c + 2 * c)
    return StageCost(gemms, weights, n * INDEX)


def step_cost(
    config: ModelConfig, batch: int, q: int, dtype: str = "fp32", positions: int | None = None, levels: int = 1
) -> StageCost:
    """One ``ar_step`` of ``q`` positions against a cache of ``positions`` (default: the model's P).

    ``levels``: distinct scale levels among the q positions (1 for a scale of the model's own schedule).
    """
    g = config.generator
    c, depth, heads, n, s, s_state = g.width, g.depth, g.heads, 2 * batch, WEIGHT_BYTES[dtype], STATE_BYTES[dtype]
    f, folded, logits = _ffn_width(c, g.mlp_ratio), g.folded_dim, g.num_branches * g.codebook_size
    p, d, rows = positions or g.positions, g.head_dim, n * q
    gemms = (
        Gemm(rows, folded, c),  # word_embed (computed at scale 0 too: a Where picks the start token)
        Gemm(rows, c, 3 * c, count=depth),
        Gemm(rows, c, c, count=depth),
        Gemm(rows, c, f, count=depth),
        Gemm(rows, f, c, count=depth),
        Gemm(q, d, p, batch=n * heads, count=depth),  # scores against the whole cache (masked)
        Gemm(q, d, q, batch=n * heads, count=depth),  # scores within the scale
        Gemm(q, p + q, d, batch=n * heads, count=depth),  # softmax · values
        Gemm(rows, c, logits),  # head
    )
    per_block = 4 * c * c + 2 * c * f + 5 * c + f + heads
    weights = s * (folded * c + c + depth * per_block + c * logits + logits + q * c + levels * c)
    inputs = s_state * (rows * folded + n * (6 * depth + 3) * c + 2 * depth * n * p * c) + q * INDEX
    return StageCost(gemms, weights, inputs)


def _cumsum_gemms(rows: int, length: int) -> tuple[Gemm, Gemm]:
    block = cumsum_block(length)
    blocks = math.ceil(length / block)
    return Gemm(rows * blocks, block, block), Gemm(rows, blocks, blocks)


def _cumsum_constants(length: int) -> int:
    block = cumsum_block(length)
    return block * block + math.ceil(length / block) ** 2


def sample_cost(config: ModelConfig, batch: int, q: int, candidates: int) -> StageCost:
    """One ``sampler`` call (fp32 whatever the bundle dtype)."""
    g = config.generator
    rows, vocab, nb = batch * q * g.num_branches, g.codebook_size, g.num_branches
    gemms = (*_cumsum_gemms(rows, candidates), *_cumsum_gemms(rows, vocab))
    weights = 4 * (_cumsum_constants(candidates) + _cumsum_constants(vocab))
    # logits, the per-image settings, and per token a uniform (4 B), a reference token and its force flag (1 B)
    inputs = 4 * (2 * batch * q * nb * vocab) + batch * (4 + INDEX + 4) + (4 + TOKEN + 1) * batch * q * nb
    return StageCost(gemms, weights, inputs)


def fold_cost(config: ModelConfig, batch: int, scale_index: int, dtype: str = "fp32") -> StageCost:
    """One ``fold`` after scale ``scale_index`` (fp32 inside; f̂ crosses in the state dtype)."""
    t = config.tokenizer
    k2, z, nb, phi = t.latent_size**2, t.code_dim, t.num_branches, t.num_phi
    q, q_next = t.scales[scale_index] ** 2, t.scales[scale_index + 1] ** 2
    max_q = max(pn * pn for pn in t.scales)
    gemms = (
        Gemm(batch * z, q, k2, count=nb),  # bicubic upsampling of each branch's codes
        Gemm(batch * k2, 9 * z, z, count=nb * phi),  # every φ conv runs; the scale's is gathered
        Gemm(batch * nb * z, k2, q_next),  # area downsampling to the next scale
    )
    rows = min(batch * q, t.codebook_size)
    weights = 4 * (2 * k2 * max_q + nb * (rows * z + phi * (9 * z * z + z)))
    inputs = TOKEN * batch * q * nb + STATE_BYTES[dtype] * batch * nb * z * k2 + INDEX * (1 + q_next)
    return StageCost(gemms, weights, inputs)


def decode_cost(config: ModelConfig, batch: int, dtype: str = "fp32") -> StageCost:
    """The ``decoder`` graph: indices → f̂ → the ViT decoder → pixels."""
    t = config.tokenizer
    k, z, nb, w, s = t.latent_size, t.code_dim, t.num_branches, t.width, WEIGHT_BYTES[dtype]
    k2, grid, patch, fd = k * k, t.grid, t.patch_size, int(t.width * t.mlp_ratio)
    tokens, head_dim = grid * grid + k2 + 2, w // t.heads
    coarse = [pn * pn for pn in t.scales if pn != k]  # scales upsampled to K
    used_phi = len(set(t.phi_index))
    gemms = (
        *(Gemm(batch * z, q, k2, count=nb) for q in coarse),
        Gemm(batch * k2, 9 * z, z, count=nb * len(t.scales)),  # one φ conv per scale
        Gemm(batch * k2, nb * z, w),  # post_quant_conv (1×1)
        Gemm(batch * tokens, w, 3 * w, count=t.depth),
        Gemm(tokens, head_dim, tokens, batch=batch * t.heads, count=t.depth),
        Gemm(tokens, tokens, head_dim, batch=batch * t.heads, count=t.depth),
        Gemm(batch * tokens, w, w, count=t.depth),
        Gemm(batch * tokens, w, fd, count=t.depth),
        Gemm(batch * tokens, fd, w, count=t.depth),
        Gemm(batch * grid * grid, w, 3 * patch * patch),  # to_pixel, on the mask tokens only
    )
    quantizer = nb * (min(batch * t.positions, t.codebook_size) * z + sum(coarse) * k2 + used_phi * (9 * z * z + z))
    vit = t.depth * (4 * w * w + 2 * w * fd + 11 * w + fd) + (grid * grid + 1) * w + 6 * w
    pixel = 3 * patch * patch * (w + 1)
    weights = s * (quantizer + nb * z * w + w + k2 * w + vit + pixel)
    return StageCost(gemms, weights, TOKEN * batch * nb * t.positions)


# ---------------------------------------------------------------------------------------------
# A whole generation
# ---------------------------------------------------------------------------------------------


def generation_costs(config: ModelConfig, batch: int, candidates: int, dtype: str = "fp32") -> dict[str, StageCost]:
    """Every stage of one generation of ``batch`` images, keyed by the profiler's labels, in loop order."""
    scales = config.generator.scales
    out = {"prefill": prefill_cost(config, batch, dtype)}
    for si, pn in enumerate(scales):
        out[f"step[{si}]"] = step_cost(config, batch, pn * pn, dtype)
        out[f"sample[{si}]"] = sample_cost(config, batch, pn * pn, candidates)
        if si < len(scales) - 1:
            out[f"fold[{si}]"] = fold_cost(config, batch, si, dtype)
    out["decode"] = decode_cost(config, batch, dtype)
    return out


def distinct_gemms(costs: Iterable[StageCost]) -> list[tuple[int, int, int, int]]:
    """The distinct (batch, m, k, n) shapes of ``costs``, in first-seen order: what the calibration times."""
    return list(dict.fromkeys(g.shape for cost in costs for g in cost.gemms))
