"""Weights into models, strictly: official files and ours both end here.

A state dict loads only if it holds exactly the model's keys with the model's shapes; otherwise
``CheckpointError`` names the tensor and the file.

The derived buffers (``attn_bias_for_masking``, which xformers builds pad to 288×288, ``lvl_1L``,
``lvl1LC``, ``zero_k_bias``) are constants of the configuration: when present they must equal the
model's own (the mask's top-left P×P block), and the model's own are loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from imagefolder.configs import ModelConfig
from imagefolder.errors import CheckpointError
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer

_DERIVED = re.compile(r"(^|\.)(lvl_1L|lvl1LC|attn_bias_for_masking|zero_k_bias)$")


def _derived_matches(key: str, found: torch.Tensor, want: torch.Tensor) -> bool:
    # xformers builds pad the mask (286 -> 288); only the top-left P×P block is meaningful.
    padded = found.dim() == want.dim() and all(f >= w for f, w in zip(found.shape, want.shape, strict=True))
    if key.endswith("attn_bias_for_masking") and padded:
        found = found[tuple(slice(0, w) for w in want.shape)]
    return found.shape == want.shape and torch.equal(found.to(want.dtype), want)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], part: str, source: str) -> None:
    """Load ``state`` into ``model`` after checking every tensor against the model's own.

    Args:
        model: the freshly built model; its derived buffers are the reference.
        state: the weights, keys as in ``model.state_dict()``.
        part: what the weights are, for messages ("tokenizer", "generator", "classifier").
        source: where they come from (the file), for messages.
    Raises:
        CheckpointError: a missing or unexpected key, a wrong shape, or a derived buffer that
            contradicts the configuration; the model is left unchanged.
    """
    expected = model.state_dict()
    state = dict(state)
    for key, want in expected.items():
        if not _DERIVED.search(key):
            continue
        found = state.get(key)
        if found is not None and not _derived_matches(key, found, want):
            raise CheckpointError(
                f"{source}: {part} buffer {key!r} {tuple(found.shape)} does not match the one derived from "
                f"the config {tuple(want.shape)} (wrong scales or config?)"
            )
        state[key] = want
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for problem, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{source}: {part} weights do not match the model: {problem} {keys[0]!r}{more}")
    for key, want in expected.items():
        if state[key].shape != want.shape:
            raise CheckpointError(
                f"{source}: {part} weights do not match the model: {key!r} expected shape {tuple(want.shape)}, "
                f"found {tuple(state[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def build_models(
    config: ModelConfig,
    tokenizer_state: Mapping[str, torch.Tensor] | None,
    generator_state: Mapping[str, torch.Tensor] | None,
    device: str | torch.device = "cpu",
    source: str = "checkpoint",
) -> tuple[Tokenizer | None, Generator | None]:
    """Build the models whose weights are given, load them strictly, move to ``device``, eval mode.

    Raises:
        CheckpointError: as ``load_strict``, naming ``source``.
    """
    tokenizer = generator = None
    if tokenizer_state is not None:
        tokenizer = Tokenizer(config.tokenizer)
        load_strict(tokenizer, tokenizer_state, "tokenizer", source)
        tokenizer = tokenizer.to(device).eval()
    if generator_state is not None:
        generator = Generator(config.generator)
        load_strict(generator, generator_state, "generator", source)
        generator = generator.to(device).eval()
    return tokenizer, generator
