"""Any checkpoint file -> built models: ours by its ``.safetensors`` suffix, official otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from imagefolder.checkpoints.native import read_checkpoint
from imagefolder.checkpoints.official import read_official
from imagefolder.checkpoints.strict import build_models
from imagefolder.configs import ModelConfig
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer


def load_checkpoint_models(
    path: str | os.PathLike,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
) -> tuple[ModelConfig, Tokenizer | None, Generator | None]:
    """The models a checkpoint holds, loaded strictly and checked tensor by tensor, in eval mode.

    Args:
        path: our ``.safetensors`` checkpoint, or an official torch file (any other suffix).
        trust_checkpoint: official files only: lift the unpickling allow-list (trusted files only).
        device: where the models go.
        config: official files only: overrides the configuration inferred from the shapes.
    Returns:
        (config, tokenizer or None, generator or None): a part the file does not hold is None.
    Raises:
        CheckpointError: the file is missing, damaged, untrusted or of another layout, or a tensor is
            missing, unexpected, of the wrong shape or dtype, or not finite (the message names it).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        config, tokenizer_state, generator_state = read_checkpoint(path)
    else:
        official = read_official(path, trust_checkpoint, config)
        config, tokenizer_state, generator_state = official.config, official.tokenizer_state, official.generator_state
    tokenizer, generator = build_models(config, tokenizer_state, generator_state, device, str(path))
    return config, tokenizer, generator
