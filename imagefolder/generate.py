"""Reference generation in PyTorch, with the official sampling semantics.

Ten forward passes (one per scale) over 2B rows under classifier-free guidance, a KV cache owned
by this loop, guidance ramped as t = cfg·si/(SN−1) over all 2V logits, then each branch's half
sampled with top-k, top-p and ``torch.multinomial`` from a seeded generator (branch 0 first, then
branch 1, at every scale: the official draw order). The exported runtime uses Gumbel-max with
explicit noise instead (``imagefolder.runtime.sampler``); with ``top_k=1`` both are greedy and agree.
"""

from __future__ import annotations

import torch

from imagefolder.errors import InputError
from imagefolder.models.generator import Generator, KVCache
from imagefolder.models.tokenizer import Tokenizer


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (…, V) logits outside the top-k, then outside the top-p nucleus, with −inf.

    Top-k keeps logits ≥ the k-th largest. Top-p sorts ascending and removes the tokens whose
    cumulative probability is ≤ 1 − p, always keeping the most likely one.
    """
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove_sorted[..., -1] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits.masked_fill_(remove, float("-inf"))
    return logits


def sample_official(logits: torch.Tensor, top_k: int, top_p: float, rng: torch.Generator | None) -> torch.Tensor:
    """(B, q, V) logits → (B, q) token ids, one multinomial draw per position."""
    b, q, v = logits.shape
    probs = filter_top_k_top_p(logits, top_k, top_p).softmax(dim=-1).view(-1, v)
    return torch.multinomial(probs, num_samples=1, generator=rng).view(b, q)


@torch.no_grad()
def generate(
    generator: Generator,
    tokenizer: Tokenizer,
    labels: torch.Tensor,
    cfg: float = 3.25,
    top_k: int = 750,
    top_p: float = 0.95,
    seed: int | None = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional generation.

    Args:
        generator, tokenizer: models in eval mode on the same device.
        labels: (B,) int64 class ids in [0, num_classes).
        cfg: guidance at the last scale (the official evaluation uses 3.25).
        top_k, top_p: per-branch filtering (official: 750, 0.95); ``top_k=1`` is greedy.
        seed: seeds the sampling generator; None draws from the global generator.
    Returns:
        images (B, 3, H, W) in [-1, 1] and indices (B, 2, P) int64.
    """
    gcfg = generator.cfg
    device = labels.device
    if labels.min() < 0 or labels.max() >= gcfg.num_classes:
        raise InputError(f"class ids must be in [0, {gcfg.num_classes}), got {labels.tolist()}")
    rng = None
    if seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
    b, v, num_scales = labels.shape[0], gcfg.codebook_size, len(gcfg.scales)
    rows = torch.cat([labels, torch.full_like(labels, gcfg.null_class)])  # (N,) conditional rows first
    logits, keys, values, cond_blocks, cond_head = generator.prefill(rows)
    cache = KVCache.allocate(gcfg, 2 * b, keys.dtype, device)
    cache.append(keys, values)
    k = tokenizer.cfg.latent_size
    f_hat = torch.zeros(b, gcfg.folded_dim, k, k, device=device)
    per_scale = []
    for si in range(num_scales):
        t = cfg * si / (num_scales - 1)
        mixed = (1 + t) * logits[:b] - t * logits[b:]  # (B, q, 2V)
        halves = [mixed[..., i * v : (i + 1) * v] for i in range(gcfg.num_branches)]  # branch 0 drawn first
        tokens = torch.stack([sample_official(h, top_k, top_p, rng) for h in halves], dim=-1)  # (B, q, 2)
        per_scale.append(tokens)
        f_hat = f_hat + tokenizer.embed_scale(tokens, si)
        if si == num_scales - 1:
            break
        x_next = tokenizer.next_scale_input(f_hat, si + 1).repeat(2, 1, 1)  # (N, q', 2Z)
        start, count = gcfg.scale_offsets[si + 1], gcfg.scales[si + 1] ** 2
        positions = torch.arange(start, start + count, device=device)
        logits, keys, values = generator.step(x_next, positions, cond_blocks, cond_head, cache.keys, cache.values)
        cache.append(keys, values)
    indices = torch.cat(per_scale, dim=1).permute(0, 2, 1)  # (B, 2, P)
    return tokenizer.fhat_to_img(f_hat), indices
