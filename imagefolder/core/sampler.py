"""The numpy reference of the exported ``sampler`` graph: CFG mix, top-k/top-p, Gumbel-max.

The same algorithm lives in ``imagefolder/models/sampler.py`` as the torch module that becomes the graph;
both give the same tokens for the same inputs. Each step is one ONNX operator TensorRT parses at
opset 17 (TopK with a constant K, Softmax, CumSum, Where, Log, ArgMax, GatherElements), so the graph
has no Multinomial, Sort or If, and sampling runs where the logits are.

Per row of logits (one image, one position, one branch):

1. mixed = (1 + t)·cond − t·uncond over the branch's V logits (t: guidance of this scale);
2. the ``candidates`` (Kc) largest, sorted descending, ties to the lower index (ONNX TopK);
3. top-k: ranks ≥ clip(top_k, 1, Kc) masked to −inf;
4. top-p: keep a rank while the probability mass before it is < top_p (rank 0 always kept;
   everything kept when top_p ≥ 1, so rounding of the cumulative sum never drops a candidate);
5. Gumbel-max: argmax over ranks of masked value + g[token], g = −log(−log(clip(u, U_MIN, U_MAX)))
   with one uniform u per vocabulary entry, first maximum on ties; the token is the candidate's
   vocabulary index.

The noise is indexed by token id, not by rank. Two tokens with nearly equal logits can swap ranks
when another implementation computes the logits a few ulps differently; with noise per rank they
would swap noise too and the sample would change (measured: one token in 572 diverged between ONNX
Runtime and PyTorch at the official width, and the rest of the image with it). With noise per
token, a swap changes nothing.

Identical tokens across implementations hold up to floating-point rounding of exp/log (a
different last bit can only matter when two scores or the top-p mass tie to within an ulp).
"""

from __future__ import annotations

import numpy as np

from imagefolder.errors import InputError

# Clipping of the uniform noise before the double log, identical in the torch graph: u = 0 would
# give g = -inf (harmless), u = 1 would give g = +inf and pick a masked candidate.
U_MIN = np.float32(1e-20)
U_MAX = np.float32(1.0 - 2.0**-24)  # largest float32 below 1


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
    noise: np.ndarray,
    candidates: int,
) -> np.ndarray:
    """Sample one token per branch and position, exactly as the ``sampler`` graph does.

    Args:
        logits: (N, q, nb·V) float32; rows [0, B) conditional, rows [B, 2B) unconditional.
        guidance: CFG weight t (scalar or shape (1,)).
        top_k: candidates kept by rank (clipped to [1, candidates]).
        top_p: nucleus mass in (0, 1]; 1 keeps every top-k candidate.
        noise: (B, q, nb, V) uniform in [0, 1): one value per vocabulary entry.
        candidates: Kc, the TopK size of the graph (≤ V).
    Returns:
        tokens (B, q, nb) int32.
    """
    logits = np.asarray(logits, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    n, q, _ = logits.shape
    batch, nb = n // 2, noise.shape[2]
    vocab = logits.shape[-1] // nb
    if n % 2 or noise.shape != (batch, q, nb, vocab) or not 1 <= candidates <= vocab:
        raise ValueError(
            f"sampler shapes: logits {logits.shape}, noise {noise.shape}, candidates {candidates} "
            f"(expected noise (N/2, q, branches, V) and 1 ≤ candidates ≤ V)"
        )
    t = np.float32(np.asarray(guidance, dtype=np.float32).reshape(-1)[0])
    k = int(np.asarray(top_k).reshape(-1)[0])
    p = np.float32(np.asarray(top_p, dtype=np.float32).reshape(-1)[0])

    split = logits.reshape(n, q, nb, vocab)  # (N, q, nb, V)
    mixed = (np.float32(1.0) + t) * split[:batch] - t * split[batch:]  # (B, q, nb, V)
    vals, idx = _top_candidates(mixed.reshape(-1, vocab), candidates)  # (R, Kc) each

    ranks = np.arange(candidates)
    keep_k = (ranks < k) | (ranks == 0)  # (Kc,) rank < clip(top_k, 1, Kc)
    masked = np.where(keep_k, vals, np.float32(-np.inf))  # (R, Kc)
    shifted = np.exp(masked - masked[:, :1])
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    before = np.cumsum(probs, axis=-1, dtype=np.float32) - probs  # mass of the higher-ranked candidates
    keep = keep_k & ((before < p) | (p >= np.float32(1.0)))

    u = np.clip(np.take_along_axis(noise.reshape(-1, vocab), idx, axis=-1), U_MIN, U_MAX)  # (R, Kc)
    gumbel = -np.log(-np.log(u))
    score = np.where(keep, masked, np.float32(-np.inf)) + gumbel
    choice = np.argmax(score, axis=-1)[:, None]  # (R, 1), first maximum
    tokens = np.take_along_axis(idx, choice, axis=-1)
    return tokens.reshape(batch, q, nb).astype(np.int32)
