"""What a training run keeps on disk, written once for every trainer of a run folder.

- ``state.pt``, the training state (exact resume): model, optimizer, EMA and any other stateful part,
  the step, the data position and every rank's RNG state. One file: an 8-byte magic, the SHA-256 of
  the payload, then the payload (``torch.save`` of plain dicts and tensors, loaded with
  ``weights_only=True``). A truncated or altered file fails the digest check with
  ``TrainingStateError`` before anything is unpickled.
- the exported model, when the schedule is complete: our checkpoint format
  (``imagefolder.checkpoints``) with the trainer, step and data in its metadata.

``RunTrainer`` holds both for the tokenizer and generator trainers; each says only which parts it
has (``stateful``) and which weights it exports (``exported_states``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from imagefolder.checkpoints import save_checkpoint
from imagefolder.configs import ModelConfig
from imagefolder.errors import CheckpointError
from imagefolder.io import atomic_write
from imagefolder.train.common import DistEnv, IndexStream, check_global_batch

log = logging.getLogger(__name__)

STATE_MAGIC = b"IFTRAIN1"
STATE_FORMAT = 1
_BOOKKEEPING = frozenset({"format", "kind", "config", "options", "step", "consumed", "rng"})


class TrainingStateError(CheckpointError):
    """A training-state file is missing, corrupted, or does not belong to this run."""


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG this package draws from, as tensors and plain values."""
    np_state, py_state = cast(tuple, np.random.get_state(legacy=True)), random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state in rank order; a collective, so every rank must call it."""
    if not env.distributed:
        return [rng_state()]
    states: list[Any] = [None] * env.world_size
    dist.all_gather_object(states, rng_state())
    return states


# ---------------------------------------------------------------------------------------------
# Training-state files
# ---------------------------------------------------------------------------------------------


def save_training_state(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a training state atomically: magic, SHA-256 of the payload, payload."""
    buf = io.BytesIO()
    torch.save({"format": STATE_FORMAT, **payload}, buf)
    data = buf.getvalue()
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(STATE_MAGIC + hashlib.sha256(data).digest() + data)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read and verify a training state written by ``save_training_state``.

    Raises:
        TrainingStateError: the file is missing, not a training state, or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingStateError(f"training state {path} does not exist")
    raw = path.read_bytes()
    head = len(STATE_MAGIC) + 32
    if len(raw) < head or raw[: len(STATE_MAGIC)] != STATE_MAGIC:
        raise TrainingStateError(f"{path} is not an imagefolder training state (bad magic)")
    digest, data = raw[len(STATE_MAGIC) : head], raw[head:]
    if hashlib.sha256(data).digest() != digest:
        raise TrainingStateError(f"{path} is corrupted: SHA-256 mismatch (truncated or modified file)")
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if payload.get("format") != STATE_FORMAT:
        raise TrainingStateError(f"{path}: unsupported training-state format {payload.get('format')}")
    return payload


# ---------------------------------------------------------------------------------------------
# A trainer's run folder
# ---------------------------------------------------------------------------------------------


class RunTrainer(ABC):
    """The training state and the export of a trainer that owns a run folder (``opts.out``).

    A subclass sets ``kind``, calls ``__init__`` first, then sets ``stream`` and ``step_count``;
    ``run_training`` (``imagefolder.train.common``) drives it.
    """

    kind: str  # "tokenizer" or "generator": recorded in the state and in the export
    export_meta: Mapping[str, str] = {}  # more metadata of the export (e.g. which weights)
    stream: IndexStream
    step_count: int

    def __init__(self, opts: Any, config: ModelConfig, env: DistEnv) -> None:
        check_global_batch(opts.batch_size, env)
        self.opts, self.config, self.env = opts, config, env

    @abstractmethod
    def stateful(self) -> dict[str, Any]:
        """Name -> every part with ``state_dict`` / ``load_state_dict`` that a resume needs."""

    @abstractmethod
    def exported_states(self) -> tuple[Mapping[str, torch.Tensor] | None, Mapping[str, torch.Tensor] | None]:
        """(tokenizer weights or None, generator weights or None) of the finished run."""

    @property
    def state_path(self) -> Path:
        return Path(self.opts.out) / "state.pt"

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (gathers every rank's RNG)."""
        return {
            "kind": self.kind,
            "config": self.config.to_dict(),
            "options": dataclasses.asdict(self.opts),
            "step": self.step_count,
            "consumed": self.stream.consumed,
            **{name: part.state_dict() for name, part in self.stateful().items()},
            "rng": gather_rng_states(self.env),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, after checking it belongs to this run.

        Raises:
            TrainingStateError: another kind of run, another model config, another world size, or
                other options (a state with a discriminator cannot resume a run without one).
        """
        if state.get("kind") != self.kind:
            raise TrainingStateError(f"training state is a {state.get('kind')} run, not a {self.kind} run")
        if state["config"] != self.config.to_dict():
            raise TrainingStateError("the training state was made with a different model config")
        if len(state["rng"]) != self.env.world_size:
            raise TrainingStateError(f"state saved by {len(state['rng'])} ranks cannot resume on {self.env.world_size}")
        parts = self.stateful()
        saved = set(state) - _BOOKKEEPING
        if saved != set(parts):
            raise TrainingStateError(
                f"the training state holds {sorted(saved)}, this run has {sorted(parts)}: it was made with other "
                f"options (discriminator, teacher); pass the original options, or --no-resume to start over"
            )
        for name, part in parts.items():
            part.load_state_dict(state[name])
        self.step_count = state["step"]
        self.stream.consumed = state["consumed"]
        set_rng_state(state["rng"][self.env.rank])

    def resume(self) -> None:
        """Continue from ``state.pt`` when the run folder has one."""
        if self.state_path.is_file():
            self.load_state(load_training_state(self.state_path))
            log.info("resumed %s at step %d", self.state_path, self.step_count)

    def save(self) -> None:
        """Write ``state.pt`` (rank 0; every rank takes part in the RNG gather)."""
        state = self.state()
        if self.env.is_main:
            save_training_state(self.state_path, state)
            log.info("saved %s at step %d", self.state_path, self.step_count)

    def export(self, path: Path) -> None:
        """Write the finished run's weights with their config (``imagefolder.checkpoints`` format)."""
        tokenizer_state, generator_state = self.exported_states()
        meta = {"trainer": self.kind, "step": self.step_count, "data": self.opts.data, **self.export_meta}
        save_checkpoint(path, self.config, tokenizer_state, generator_state, extra_meta=meta)
