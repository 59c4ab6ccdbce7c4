"""The configuration official-layout weights were built with, read from their tensor shapes.

Widths, depths, vocabulary and branch count come from shapes; the scales from the file's own
``patch_nums`` when given, else the official scales when they fit. The result is the first preset
with the same shapes, else a ``custom-...`` config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from imagefolder.configs import OFFICIAL_SCALES, PRESETS, GeneratorConfig, ModelConfig, TokenizerConfig
from imagefolder.errors import CheckpointError


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct integer indices right after ``prefix`` (``blocks.0.``, ``blocks.1.`` ...)."""
    heads = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return sum(h.isdigit() for h in heads)


def _shape(state: Mapping[str, torch.Tensor], key: str, part: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"cannot infer the {part} configuration: key {key!r} is missing; pass a config")
    return tuple(state[key].shape)


def _resolve_scales(
    hint: tuple[int, ...] | None, fits: Callable[[tuple[int, ...]], bool], what: str
) -> tuple[int, ...]:
    """The file's own scales (``patch_nums``) when it names them, else the official ones, if they fit."""
    if hint is not None:
        if not fits(hint):
            raise CheckpointError(f"the file's patch_nums {hint} do not fit its {what}")
        return hint
    if fits(OFFICIAL_SCALES):
        return OFFICIAL_SCALES
    raise CheckpointError(f"cannot infer the scales from the {what}: not the official ones; pass a config")


def _infer_tokenizer(state: Mapping[str, torch.Tensor], hint: tuple[int, ...] | None) -> TokenizerConfig:
    part = "tokenizer"
    _, tokens, width = _shape(state, "encoder.model.pos_embed", part)
    patch = _shape(state, "encoder.model.patch_embed.proj.weight", part)[-1]
    grid = math.isqrt(tokens - 1)
    if grid * grid + 1 != tokens:
        raise CheckpointError(f"encoder.model.pos_embed has {tokens} tokens, not 1 + a square grid")
    vocab, code_dim = _shape(state, "quantizes.0.embedding.weight", part)
    branches = _count(state, "quantizes.")
    num_scales = _shape(state, "quantizes.0.ema_vocab_hit_SV", part)[0]
    latents = _shape(state, "encoder.latent_tokens", part)[1] // branches
    scales = _resolve_scales(
        hint, lambda s: len(s) == num_scales and s[-1] ** 2 == latents, f"{num_scales} scales and {latents} latents"
    )
    return TokenizerConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        depth=_count(state, "encoder.model.blocks."),
        heads=max(1, width // 64),  # DINOv2 head dim; the checkpoint holds no per-head tensor
        mlp_ratio=_shape(state, "encoder.model.blocks.0.mlp.fc1.weight", part)[0] / width,
        codebook_size=vocab,
        code_dim=code_dim,
        num_branches=branches,
        scales=scales,
        num_phi=_count(state, "quantizes.0.quant_resi.qresi_ls."),
        with_teacher=any(k.startswith("semantic_model.") for k in state),
    )


def _infer_generator(state: Mapping[str, torch.Tensor], hint: tuple[int, ...] | None, branches: int) -> GeneratorConfig:
    part = "generator"
    width = _shape(state, "pos_start", part)[-1]
    depth = _count(state, "blocks.")
    positions = _shape(state, "pos_1LC", part)[1]
    scales = _resolve_scales(hint, lambda s: sum(pn * pn for pn in s) == positions, f"{positions} positions")
    return GeneratorConfig(
        depth=depth,
        width=width,
        heads=_shape(state, "blocks.0.attn.scale_mul_1H11", part)[1],
        mlp_ratio=_shape(state, "blocks.0.ffn.fc1.weight", part)[0] / width,
        num_classes=_shape(state, "class_emb.weight", part)[0] - 1,
        codebook_size=_shape(state, "head.weight", part)[0] // branches,
        code_dim=_shape(state, "word_embed.weight", part)[1] // branches,
        num_branches=branches,
        scales=scales,
        drop_path=0.1 * depth / 24,  # official rule; training only
    )


_TOKENIZER_SHAPE_FIELDS = (
    "image_size",
    "patch_size",
    "width",
    "depth",
    "mlp_ratio",
    "codebook_size",
    "code_dim",
    "num_branches",
    "scales",
    "num_phi",
    "with_teacher",
)
_GENERATOR_SHAPE_FIELDS = (
    "depth",
    "width",
    "heads",
    "mlp_ratio",
    "num_classes",
    "codebook_size",
    "code_dim",
    "num_branches",
    "scales",
)


def _same_shapes(a: Any, b: Any, fields: tuple[str, ...]) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _pair(tok: TokenizerConfig | None, gen: GeneratorConfig | None) -> ModelConfig:
    """A ModelConfig for the inferred part(s): the first matching preset, else a custom one."""
    for preset in PRESETS.values():
        if (tok is None or _same_shapes(tok, preset.tokenizer, _TOKENIZER_SHAPE_FIELDS)) and (
            gen is None or _same_shapes(gen, preset.generator, _GENERATOR_SHAPE_FIELDS)
        ):
            return preset
    # A part absent from the file gets the official architecture with the present part's vocabulary.
    vocab = ("codebook_size", "code_dim", "num_branches", "scales")
    if tok is None:
        tok = TokenizerConfig(**{k: getattr(gen, k) for k in vocab})
    if gen is None:
        gen = dataclasses.replace(GeneratorConfig(), **{k: getattr(tok, k) for k in vocab})
    name = f"custom-d{gen.depth}-{gen.codebook_size}"
    try:
        return ModelConfig(name=name, tokenizer=tok, generator=gen)
    except ValueError as exc:
        raise CheckpointError(f"the tokenizer and generator weights do not belong together: {exc}") from exc


def infer_config(
    tokenizer_state: Mapping[str, torch.Tensor] | None,
    generator_state: Mapping[str, torch.Tensor] | None,
    scales: tuple[int, ...] | None = None,
) -> ModelConfig:
    """The configuration that official-layout weights (either part or both) were built with.

    Sizes come from tensor shapes; ``scales`` (the file's ``patch_nums``) defaults to the official scales
    when they fit. The result is the first preset with the same shapes, else a ``custom-...`` config
    (the tokenizer's head count, which no tensor records, is then ``width // 64`` as in DINOv2).
    """
    if tokenizer_state is None and generator_state is None:
        raise ValueError("no weights to infer a config from")
    tok = None if tokenizer_state is None else _infer_tokenizer(tokenizer_state, scales)
    branches = 2 if tok is None else tok.num_branches
    gen = None if generator_state is None else _infer_generator(generator_state, scales, branches)
    return _pair(tok, gen)
