"""Our checkpoint format: ONE ``.safetensors`` file plus a ``<stem>.json`` sidecar, and ``convert``.

The weights file holds the tensors only (keys prefixed ``tokenizer.`` / ``generator.``; no pickle,
so reading it runs no code) and metadata ``format``, ``format_version``, ``config`` JSON and
free-form extras; the sidecar repeats the config for people and tools. Both are written atomically
(``imagefolder.io.atomic_write``), so a failed write leaves the previous version as it was.
``convert`` turns an official file into this format after a strict, validated load.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from imagefolder.checkpoints.official import read_official
from imagefolder.checkpoints.strict import build_models
from imagefolder.configs import ModelConfig
from imagefolder.errors import CheckpointError, InputError, OutputError
from imagefolder.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "imagefolder-checkpoint"
FORMAT_VERSION = "1"
_PARTS = ("tokenizer", "generator")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar next to a checkpoint: ``<stem>.json``."""
    return Path(path).with_suffix(".json")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors and string metadata as a ``.safetensors`` file, atomically; returns the path.

    The tensors are written from own, contiguous CPU copies: safetensors refuses shared or strided
    storage, and a state dict often holds both (tied weights, transposed views).
    """
    path = Path(path)
    copies = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in tensors.items()}
    try:
        with atomic_write(path) as tmp:
            save_file(copies, tmp, metadata=metadata)
    except SafetensorError as err:  # its I/O failures are not OSErrors: the message carries the OS's reason
        raise OutputError(f"cannot write the output {path}: {err}") from err
    return path


def save_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    tokenizer_state: Mapping[str, torch.Tensor] | None,
    generator_state: Mapping[str, torch.Tensor] | None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights + config as one ``.safetensors`` file and a ``<stem>.json`` sidecar, atomically.

    Args:
        path: the ``.safetensors`` destination; the sidecar goes beside it.
        config: the models' configuration, stored with the weights.
        tokenizer_state, generator_state: either or both parts (``state_dict()``).
        extra_meta: free-form provenance; values that are not strings are stored as JSON.
    Returns:
        The checkpoint path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: our checkpoints are .safetensors files; give the destination that suffix")
    if tokenizer_state is None and generator_state is None:
        raise ValueError("nothing to save: both tokenizer_state and generator_state are None")
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_meta or {}).items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config.to_dict())}
    clash = sorted(set(extra) & set(metadata))
    if clash:
        raise ValueError(f"extra_meta may not set the reserved keys {clash}")
    states = dict(zip(_PARTS, (tokenizer_state, generator_state), strict=True))
    tensors = {f"{part}.{key}": value for part, state in states.items() for key, value in (state or {}).items()}
    write_safetensors(path, tensors, {**metadata, **extra})
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": path.name,
        "parts": [part for part, state in states.items() if state is not None],
        "config": config.to_dict(),
        "meta": extra,
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    log.info("wrote %s (%d tensors) and %s", path, len(tensors), sidecar_path(path).name)
    return path


def read_checkpoint(
    path: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """Read our ``.safetensors`` checkpoint -> (config, tokenizer state or None, generator state or None).

    The states are returned as stored; ``strict.build_models`` checks them against the models.

    Raises:
        CheckpointError: missing, truncated, of another format or version, or with invalid config metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an {FORMAT} file (format={meta.get('format')!r})")
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: format_version {meta.get('format_version')!r} is not supported; this version "
                    f"reads format_version {FORMAT_VERSION!r}"
                )
            states: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PARTS}
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                part, _, name = key.partition(".")
                if part not in states:
                    raise CheckpointError(f"{path}: unexpected tensor {key!r} (not tokenizer.* or generator.*)")
                states[part][name] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: file is truncated or not a safetensors checkpoint ({exc})") from exc
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid config metadata ({exc})") from exc
    return config, states["tokenizer"] or None, states["generator"] or None


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    trust_checkpoint: bool = False,
    config: ModelConfig | None = None,
) -> Path:
    """Official file -> our ``.safetensors`` + JSON, written only after a strict, validated load.

    Args:
        src: an official AR, tokenizer or bare state-dict file.
        dst: the ``.safetensors`` destination (left untouched when ``src`` is refused).
        trust_checkpoint: lift the unpickling allow-list (trusted files only).
        config: overrides the configuration inferred from ``src``.
    Returns:
        The written checkpoint path.
    """
    src = Path(src)
    ckpt = read_official(src, trust_checkpoint, config)
    tokenizer, generator = build_models(ckpt.config, ckpt.tokenizer_state, ckpt.generator_state, "cpu", str(src))
    extra = {"source": src.name, "source_layout": ckpt.meta["layout"]}
    if "weights" in ckpt.meta:
        extra["source_weights"] = ckpt.meta["weights"]
    return save_checkpoint(
        dst,
        ckpt.config,
        None if tokenizer is None else tokenizer.state_dict(),
        None if generator is None else generator.state_dict(),
        extra,
    )
