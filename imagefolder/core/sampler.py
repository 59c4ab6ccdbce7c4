"""The sampler: its algorithm as the numpy reference, its constants, and the per-image random stream.

The same algorithm lives in ``imagefolder/models/sampler.py`` as the torch module exported as the
``sampler`` graph; both give the same tokens for the same inputs. Per row of logits (one image, one
position, one branch) and **one uniform u per token**:

1. mixed = (1 + t)·cond − t·uncond over the branch's V logits (t: guidance of this scale);
2. the ``candidates`` (Kc) largest, in rank order (TopK, ties to the lower index);
3. top-k: ranks ≥ clip(top_k, 1, Kc) are dropped;
4. top-p over the softmax of what is left: a rank is kept while the probability mass ranked before
   it is < top_p (rank 0 always; everything when top_p ≥ 1, so rounding never drops a candidate);
5. the draw, by inverse CDF over the kept candidates **in token-id order**: the kept probabilities
   are scattered back to their vocabulary positions, summed cumulatively in token-id order, and the
   token is the first kept one whose cumulative mass exceeds u · (kept mass);
6. teacher forcing (conditioned generation, schema 5): where the force mask is set, the token is the
   reference's instead of the drawn one (a Where: the draw still runs, so a forced and an unforced
   token cost the same and nothing in the graph branches).

This is the official distribution (top-k, then top-p, then a draw proportional to the probabilities
of what is kept; tested against it with a chi-square test), with a property the official
``torch.multinomial`` lacks: the token depends on the kept candidates' probabilities by token id, not
on their rank order. Two tokens with nearly equal logits can swap ranks when another implementation
(ONNX Runtime, TensorRT, PyTorch) computes the logits a few ulps differently; a draw in rank order
would then change the sample, in token-id order it changes nothing. Identical tokens across
implementations hold up to floating-point rounding (a different last bit can only matter when u
falls within an ulp of a boundary of the cumulative mass, or the top-p mass ties to within an ulp).

The graph uses no CumSum (TensorRT 10.3 turns it into a loop of Kc iterations), Loop, Sort,
Multinomial or If: cumulative sums are blocked matrix products with constant triangular matrices
(``blocked_cumsum``), the scatter is ScatterElements, the pick an ArgMax.

The random stream: image ``index`` of a request with seed ``seed`` draws its P × branches uniforms
from ``numpy.random.default_rng((seed, index))`` (``image_uniforms``), whatever the batch it is
generated in, so a server that batches requests returns each what it would get alone.
"""

from __future__ import annotations

import numpy as np

from imagefolder.errors import InputError

# The uniforms are clipped to [0, U_MAX] so that u · total < total for every float32 total: at
# U_MAX = 1 − 2⁻²³ the product is at least one ulp below the total (at 1 − 2⁻²⁴ it can round up to it).
U_MAX = np.float32(1.0 - 2.0**-23)

# TensorRT's TopK takes K < 3840 (a constant); the sampler keeps at most this many candidates per branch.
TRT_TOPK_LIMIT = 3840


def default_candidates(codebook_size: int, requested: int | None = None) -> int:
    """The sampler's TopK size Kc: ``requested`` if valid, else the whole codebook when TensorRT allows
    it, else 1024 (≥ the official top-k of 750)."""
    limit = min(codebook_size, TRT_TOPK_LIMIT - 1)
    if requested is not None:
        if not 1 <= requested <= limit:
            raise InputError(f"the sampler's candidates must be in [1, {limit}], got {requested}")
        return requested
    return codebook_size if codebook_size < TRT_TOPK_LIMIT else 1024


def cumsum_block(length: int) -> int:
    """The block size of ``blocked_cumsum`` for a row of ``length``: about √length, so both products are small."""
    return max(1, int(np.ceil(np.sqrt(length))))


def image_uniforms(seed: int, index: int, positions: int, branches: int) -> np.ndarray:
    """The (positions, branches) float32 uniforms of image ``index`` of a request seeded ``seed``.

    Position-major in the concatenated order of the scales: scale si uses rows ``start:start+q``.
    """
    return np.random.default_rng((int(seed), int(index))).random((positions, branches), dtype=np.float32)


def _top_candidates(mixed: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``candidates`` values and indices of each row of ``mixed`` (R, V), descending, ties to the lower index."""
    rows, vocab = mixed.shape
    if candidates < vocab:
        # Select exactly `candidates` entries per row: all above the k-th largest value, then the
        # lowest-index entries equal to it. O(V) per row instead of a full sort.
        kth = -np.partition(-mixed, candidates - 1, axis=-1)[:, candidates - 1 : candidates]  # (R, 1)
        above = mixed > kth
        equal = mixed == kth
        room = candidates - above.sum(axis=-1, keepdims=True)
        chosen = above | (equal & (np.cumsum(equal, axis=-1) <= room))
        idx = np.nonzero(chosen)[1].reshape(rows, candidates)  # ascending index per row
    else:
        idx = np.broadcast_to(np.arange(vocab), (rows, vocab))
    vals = np.take_along_axis(mixed, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")  # stable: equal values keep ascending index
    return np.take_along_axis(vals, order, axis=-1), np.take_along_axis(idx, order, axis=-1)


def sample_tokens(
    logits: np.ndarray,
    guidance: float | np.ndarray,
    top_k: int | np.ndarray,
    top_p: float | np.ndarray,
    uniforms: np.ndarray,
    candidates: int,
    reference: np.ndarray | None = None,
    force: np.ndarray | None = None,
) -> np.ndarray:
    """Sample one token per branch and position, exactly as the ``sampler`` graph does.

    Args:
        logits: (N, q, nb·V) float32; rows [0, B) conditional, rows [B, 2B) unconditional.
        guidance: CFG weight t, per image (B,) or one for all.
        top_k: candidates kept by rank (clipped to [1, candidates]), per image (B,) or one for all.
        top_p: nucleus mass in (0, 1] (1 keeps every top-k candidate), per image (B,) or one for all.
        uniforms: (B, q, nb) in [0, 1): one per token.
        candidates: Kc, the TopK size of the graph (≤ V).
        reference: (B, q, nb) reference tokens, returned where ``force`` is set (default: none).
        force: (B, q, nb) bool, where the reference token replaces the drawn one (default: nowhere).
    Returns:
        tokens (B, q, nb) int32.
    """
    logits = np.asarray(logits, dtype=np.float32)
    uniforms = np.asarray(uniforms, dtype=np.float32)
    n, q, width = logits.shape
    batch, nb = n // 2, uniforms.shape[-1] if uniforms.ndim == 3 else 0
    if n % 2 or uniforms.shape != (batch, q, nb) or nb == 0 or width % nb or not 1 <= candidates <= width // nb:
        raise ValueError(
            f"sampler shapes: logits {logits.shape}, uniforms {uniforms.shape}, candidates {candidates} "
            f"(expected uniforms (N/2, q, branches) and 1 ≤ candidates ≤ V)"
        )
    vocab = width // nb

    def per_row(value, dtype) -> np.ndarray:  # one value per image → one per row of (B·q·nb)
        per_image = np.broadcast_to(np.asarray(value, dtype=dtype).reshape(-1), (batch,))
        return np.repeat(per_image, q * nb)[:, None]

    t = np.broadcast_to(np.asarray(guidance, dtype=np.float32).reshape(-1), (batch,)).reshape(batch, 1, 1, 1)
    k, p = per_row(top_k, np.int64), per_row(top_p, np.float32)  # (R, 1)

    split = logits.reshape(n, q, nb, vocab)  # (N, q, nb, V)
    mixed = (np.float32(1.0) + t) * split[:batch] - t * split[batch:]  # (B, q, nb, V)
    vals, idx = _top_candidates(mixed.reshape(-1, vocab), candidates)  # (R, Kc) each, rank order

    ranks = np.arange(candidates)
    keep_k = (ranks < k) | (ranks == 0)  # (R, Kc): rank < clip(top_k, 1, Kc)
    masked = np.where(keep_k, vals, np.float32(-np.inf))
    shifted = np.exp(masked - masked[:, :1])
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    before = np.cumsum(probs, axis=-1, dtype=np.float32) - probs  # mass of the higher-ranked candidates
    keep = keep_k & ((before < p) | (p >= np.float32(1.0)))
    kept = np.where(keep, probs, np.float32(0.0))  # (R, Kc)

    dense = np.zeros((kept.shape[0], vocab), np.float32)  # the kept probabilities in token-id order
    np.put_along_axis(dense, idx, kept, axis=-1)
    cdf = np.cumsum(dense, axis=-1, dtype=np.float32)
    kept_tokens = dense > 0
    total = np.where(kept_tokens, cdf, np.float32(0.0)).max(axis=-1, keepdims=True)
    target = np.clip(uniforms.reshape(-1, 1), 0.0, U_MAX) * total
    tokens = np.argmax(kept_tokens & (cdf > target), axis=-1)  # the first kept token past u · total
    drawn = tokens.reshape(batch, q, nb).astype(np.int32)
    if force is None:
        return drawn
    if reference is None or np.shape(reference) != drawn.shape or np.shape(force) != drawn.shape:
        raise ValueError(f"reference and force must both have the tokens' shape {drawn.shape}")
    return np.where(np.asarray(force, dtype=bool), np.asarray(reference, dtype=np.int32), drawn)
