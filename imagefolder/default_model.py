"""The small default model that ships with the package, and checkpoint resolution for commands.

Every command that takes ``--checkpoint`` falls back to the default model when none is given, so a
new user sees the whole path work at once. The default model is the ``tiny`` preset trained by
``scripts/train_default_model.sh`` on the embedded shapes data set.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from imagefolder.configs import ModelConfig
from imagefolder.errors import CheckpointError, ImagefolderError
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "default-tiny.safetensors"


class DefaultModelMissing(ImagefolderError, FileNotFoundError):
    """The package was installed without its default weights."""


def default_weights_path() -> Path:
    """Path of the shipped default weights (may not exist in a source checkout without assets)."""
    return Path(str(resources.files("imagefolder") / "assets" / DEFAULT_WEIGHTS))


def load_default_or_checkpoint(
    checkpoint: str | Path | None = None, trust_checkpoint: bool = False, device: str = "cpu"
) -> tuple[ModelConfig, Tokenizer, Generator, dict]:
    """The tokenizer + generator pair that generation needs: from ``checkpoint``, or the default model.

    Unlike ``imagefolder.checkpoints.load_checkpoint_models``, which returns whichever parts a file
    holds, this requires both and records where they came from.

    Returns:
        (config, tokenizer, generator, source) with both models in eval mode; ``source`` records
        where the weights came from (path and sha256), for bundle manifests.
    Raises:
        DefaultModelMissing: no checkpoint given and the package has no default weights.
        CheckpointError: the checkpoint cannot be loaded, or lacks one of the two models.
    """
    from imagefolder.checkpoints import load_checkpoint_models
    from imagefolder.io import sha256_file

    path = Path(checkpoint) if checkpoint is not None else default_weights_path()
    if checkpoint is None and not path.exists():
        raise DefaultModelMissing(
            f"the default model's weights are missing ({path}); reinstall imagefolder or pass --checkpoint"
        )
    config, tokenizer, generator = load_checkpoint_models(path, trust_checkpoint=trust_checkpoint, device=device)
    if tokenizer is None or generator is None:
        missing = "tokenizer" if tokenizer is None else "generator"
        raise CheckpointError(f"{path} holds no {missing}; generation needs both (an AR checkpoint or ours)")
    source = {"checkpoint": "default" if checkpoint is None else str(path), "sha256": sha256_file(path)}
    return config, tokenizer.eval(), generator.eval(), source
