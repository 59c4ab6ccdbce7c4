"""The official ImageFolder checkpoint files (the released ``ar-ckpt-last.pth`` and ``best_ckpt.pt``): which
layout a file has, where its weights and bookkeeping sit, and the configuration they were built with.

* AR ``ar-ckpt-last.pth``: ``{'epoch', 'iter', 'args': dict, 'trainer': {'config', 'var_wo_ddp',
  'vae_local', 'var_opt'}}``, i.e. generator and tokenizer weights plus optimizer state;
* tokenizer ``best_ckpt.pt``: ``{'model', 'ema', 'optimizer', 'discriminator', 'optimizer_disc',
  'steps', 'args': argparse.Namespace}`` (``ema`` is preferred, as the official VAR training does);
* a bare ``state_dict`` of either model.

Files are unpickled with the allow-list of ``unpickle``; ``module.`` / ``_orig_mod.`` wrapper
prefixes are stripped. The scales come from the file's own ``patch_nums`` when present (else the
official scales, when they fit); everything else from tensor shapes (``infer``). Loading the
weights into models, strictly, is ``strict.build_models``'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagefolder.checkpoints.infer import infer_config
from imagefolder.checkpoints.unpickle import plain, safe_load
from imagefolder.configs import ModelConfig
from imagefolder.errors import CheckpointError

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class OfficialCheckpoint:
    """What an official file holds: the inferred (or given) config and the raw weights.

    The states are as stored, with wrapper prefixes stripped; derived buffers are reconciled when
    they are loaded into models (``build_models``). ``meta`` holds ``layout`` ("ar", "tokenizer" or
    "state_dict") and the file's bookkeeping (epoch, iter, steps, args, trainer config) as plain data.
    """

    config: ModelConfig
    tokenizer_state: dict[str, torch.Tensor] | None
    generator_state: dict[str, torch.Tensor] | None
    meta: dict[str, Any]


def _state_dict(obj: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: {what} is not a state dict (found {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {what} entry {key!r} is a {type(value).__name__}, not a tensor")
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _split_layout(obj: Any, path: Path) -> tuple[dict | None, dict | None, dict[str, Any]]:
    """-> (tokenizer state, generator state, meta) of any official layout."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    trainer = obj.get("trainer")
    if isinstance(trainer, Mapping) and "var_wo_ddp" in trainer:
        meta = {
            "layout": "ar",
            "epoch": plain(obj.get("epoch")),
            "iter": plain(obj.get("iter")),
            "args": plain(obj.get("args")),
            "trainer_config": plain(trainer.get("config")),
        }
        vae = trainer.get("vae_local")
        tok = None if vae is None else _state_dict(vae, "trainer['vae_local']", path)
        return tok, _state_dict(trainer["var_wo_ddp"], "trainer['var_wo_ddp']", path), meta
    if obj.get("ema") is not None or obj.get("model") is not None:
        which = "ema" if obj.get("ema") is not None else "model"
        meta = {
            "layout": "tokenizer",
            "weights": which,
            "steps": plain(obj.get("steps")),
            "args": plain(obj.get("args")),
        }
        return _state_dict(obj[which], f"[{which!r}]", path), None, meta
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = _state_dict(obj, "the state dict", path)
        is_gen = "pos_start" in state
        is_tok = any(k.startswith(("encoder.", "quantizes.")) for k in state)
        if is_gen != is_tok:
            meta = {"layout": "state_dict"}
            return (None, state, meta) if is_gen else (state, None, meta)
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(f"{path}: not an official ImageFolder checkpoint layout (top-level keys: {keys})")


def _scales_hint(meta: dict[str, Any]) -> tuple[int, ...] | None:
    sources = (meta.get("trainer_config"), meta.get("args"))
    for source in sources:
        if isinstance(source, dict):
            for key in ("patch_nums", "v_patch_nums"):
                value = source.get(key)
                if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                    return tuple(value)
    return None


def read_official(
    path: str | os.PathLike, trust_checkpoint: bool = False, config: ModelConfig | None = None
) -> OfficialCheckpoint:
    """Read an official AR, tokenizer or bare state-dict file and infer its configuration.

    Args:
        path: the file (a torch pickle, zip or legacy format).
        trust_checkpoint: lift the unpickling allow-list (trusted files only).
        config: overrides the inference (needed for non-official scales without ``patch_nums``).
    Returns:
        The raw weights as stored, the configuration and the file's bookkeeping; nothing is loaded
        into a model yet.
    Raises:
        CheckpointError: unreadable, untrusted or not an official layout, or no config fits.
    """
    path = Path(path)
    tok, gen, meta = _split_layout(safe_load(path, trust_checkpoint), path)
    if config is None:
        try:
            config = infer_config(tok, gen, _scales_hint(meta))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        log.info("%s: %s layout, inferred config %r", path, meta["layout"], config.name)
    return OfficialCheckpoint(config=config, tokenizer_state=tok, generator_state=gen, meta=meta)
