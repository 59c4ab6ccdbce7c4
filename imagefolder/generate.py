"""Reference generation in PyTorch, with the official sampling semantics.

Ten forward passes (one per scale) over 2B rows under classifier-free guidance, a KV cache owned
by this loop, guidance ramped as t = cfg·si/(SN−1) over all 2V logits, then each branch's half
sampled with top-k, top-p and ``torch.multinomial`` from a seeded generator (branch 0 first, then
branch 1, at every scale: the official draw order). The exported runtime uses Gumbel-max with
explicit noise instead (``imagefolder.core.sampler``); with ``top_k=1`` both are greedy and agree.
"""

from __future__ import annotations

import torch

from imagefolder.core.schedule import SamplingParams, cfg_rows, check_labels, guidance, positions
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
    cfg: float = SamplingParams.cfg,
    top_k: int = SamplingParams.top_k,
    top_p: float = SamplingParams.top_p,
    seed: int = SamplingParams.seed,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional generation with the official draw order.

    Args:
        generator, tokenizer: models in eval mode on the same device.
        labels: (B,) int64 class ids in [0, num_classes).
        cfg, top_k, top_p, seed: as ``core.schedule.SamplingParams`` (validated the same way on every
            path); ``top_k=1`` is greedy. The seed seeds a ``torch.Generator`` on the labels' device.
    Returns:
        images (B, 3, H, W) in [-1, 1] and indices (B, 2, P) int64.
    """
    params = SamplingParams(cfg=cfg, top_k=top_k, top_p=top_p, seed=seed)
    gcfg = generator.cfg
    device = labels.device
    rows = torch.as_tensor(
        cfg_rows(check_labels(labels.cpu().numpy(), gcfg.num_classes), gcfg.null_class), device=device
    )
    rng = torch.Generator(device=device)
    rng.manual_seed(params.seed)
    b, v, num_scales = labels.shape[0], gcfg.codebook_size, len(gcfg.scales)
    cond_start, cond_blocks, cond_head = generator.prefill(rows)
    cache = KVCache.allocate(gcfg, 2 * b, cond_start.dtype, device)
    k = tokenizer.cfg.latent_size
    f_hat = torch.zeros(b, gcfg.folded_dim, k, k, device=device)
    x_next = torch.zeros(2 * b, 1, gcfg.folded_dim, device=device, dtype=cond_start.dtype)  # unused at scale 0
    per_scale = []
    for si in range(num_scales):
        scale_positions = torch.as_tensor(positions(gcfg.scales, si), device=device)
        logits, keys, values = generator.step(
            x_next, scale_positions, cond_start, cond_blocks, cond_head, cache.keys, cache.values
        )
        cache.append(keys, values)
        t = guidance(params.cfg, si, num_scales)
        mixed = (1 + t) * logits[:b] - t * logits[b:]  # (B, q, 2V)
        halves = [mixed[..., i * v : (i + 1) * v] for i in range(gcfg.num_branches)]  # branch 0 drawn first
        tokens = torch.stack([sample_official(h, params.top_k, params.top_p, rng) for h in halves], dim=-1)
        per_scale.append(tokens)  # (B, q, 2)
        f_hat = f_hat + tokenizer.embed_scale(tokens, si)
        if si == num_scales - 1:
            break
        x_next = tokenizer.next_scale_input(f_hat, si + 1).repeat(2, 1, 1)  # (N, q', 2Z)
    indices = torch.cat(per_scale, dim=1).permute(0, 2, 1)  # (B, 2, P)
    return tokenizer.fhat_to_img(f_hat), indices
