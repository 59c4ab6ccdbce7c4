"""Small real models, checkpoints and bundles shared by the tests (built once per session)."""

from __future__ import annotations

import dataclasses
import math

import torch

from imagefolder.configs import ModelConfig, TokenizerConfig, official
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer


def randomized(config: ModelConfig, seed: int = 0) -> tuple[Tokenizer, Generator]:
    """Models with random weights in which every path matters (AdaLN and head modulation non-zero)."""
    torch.manual_seed(seed)
    tokenizer = Tokenizer(config.tokenizer).eval()
    generator = Generator(config.generator).eval()
    for ada in [b.ada_lin[-1] for b in generator.blocks] + [generator.head_nm.ada_lin[-1]]:
        torch.nn.init.normal_(ada.weight, std=0.02)
    torch.nn.init.normal_(generator.head.weight, std=0.05)
    return tokenizer, generator


def official_width(depth: int = 1) -> ModelConfig:
    """The official widths (ViT-B tokenizer at 256 px, VAR C=1088, H=17, V=4096, all ten scales) at reduced depth."""
    base = official()
    tok: TokenizerConfig = dataclasses.replace(base.tokenizer, depth=depth, with_teacher=False)
    gen = dataclasses.replace(base.generator, depth=depth)
    return ModelConfig(name=f"official-width-d{depth}", tokenizer=tok, generator=gen)


def cache_sensitive(config: ModelConfig, seed: int = 0) -> tuple[Tokenizer, Generator]:
    """``randomized`` models whose tokens lean on the KV cache: every head attends at the largest temperature the
    model allows (100, so attention picks a few positions instead of averaging all) and the values are 4x larger,
    so a cache entry written at the wrong position, into the wrong layer or left over from the previous
    generation changes many tokens instead of a few (greedy, batch 4 at tiny: 30 % of them for "every scale at
    position 0", against 6 % with ``randomized``)."""
    tokenizer, generator = randomized(config, seed)
    with torch.no_grad():
        for block in generator.blocks:
            block.attn.scale_mul_1H11.fill_(math.log(100.0))
            width = block.attn.mat_qkv.weight.shape[1]
            block.attn.mat_qkv.weight[2 * width :] *= 4.0
    return tokenizer, generator
