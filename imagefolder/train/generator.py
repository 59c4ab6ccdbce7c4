"""Generator (VAR with folded tokens) training: teacher forcing through a frozen tokenizer.

The official AR recipe (``imagefolder-official.md`` §3, §7) at any size:
- the tokenizer is frozen (its EMA weights) and turns each image into two branches' indices; the
  teacher-forcing input is ``indices_to_generator_input`` (area-downsampled running f̂);
- one forward over all P positions under the block-causal mask (built into ``Generator.forward``);
- cross-entropy on each half of the 2V logits against its branch's indices, the two averaged, every
  position weighted equally;
- class dropout to the null class with probability ``cond_drop`` (inside ``Generator.forward``);
- AdamW (0.9, 0.95), weight decay 0.05, linear warm-up then linear decay to 1% of the LR,
  gradient clipping at 2.0.

Runs on one process or under torchrun (DistributedDataParallel). The run folder holds ``state.pt``
(exact resume), ``metrics.jsonl`` and, at the end, ``model.safetensors`` (tokenizer + generator,
loadable by ``imagefolder.checkpoints.load_checkpoint_models``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefolder.configs import ModelConfig
from imagefolder.data import collate, open_dataset
from imagefolder.errors import CheckpointError, InputError
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.train.common import (
    DistEnv,
    IndexStream,
    adamw,
    lr_factor,
    run_training,
    seed_everything,
    set_lr,
    shard,
    unwrap,
)
from imagefolder.train.options import (
    BETAS,
    COUNT,
    FRACTION,
    POSITIVE,
    SEED,
    START_STEP,
    STEPS_OR_NONE,
    WEIGHT,
    check_options,
)
from imagefolder.train.state import RunTrainer

log = logging.getLogger(__name__)


@dataclass
class GeneratorTrainConfig:
    """Options of one generator run (the command's flags); out-of-range values raise ``InputError``."""

    out: str
    tokenizer: str  # checkpoint holding the frozen tokenizer (its EMA weights)
    data: str = "shapes"
    steps: int = 2000
    batch_size: int = 32  # global, over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 100
    final_lr: float = 0.01  # linear decay to this fraction of lr
    grad_clip: float = 2.0
    seed: int = 0
    log_every: int = 50
    save_every: int = 500
    stop_at: int | None = None  # leave the loop after this step (the schedule still spans ``steps``)
    resume: bool = True

    def __post_init__(self) -> None:
        check_options(vars(self), _GENERATOR_RANGES)


_GENERATOR_RANGES = {
    "steps": COUNT,
    "batch_size": COUNT,
    "lr": POSITIVE,
    "weight_decay": WEIGHT,
    "betas": BETAS,
    "warmup": START_STEP,
    "final_lr": FRACTION,
    "grad_clip": POSITIVE,
    "seed": SEED,
    "log_every": COUNT,
    "save_every": COUNT,
    "stop_at": STEPS_OR_NONE,
}


def branch_cross_entropy(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the two branches' cross-entropies, averaged.

    Args:
        logits: (B, P, 2V), branch 0 in the first half.
        indices: (B, 2, P) int64 targets.
    """
    v = logits.shape[-1] // 2
    halves = logits.unflatten(-1, (2, v))  # (B, P, 2, V)
    losses = [F.cross_entropy(halves[:, :, i].flatten(0, 1), indices[:, i].flatten()) for i in range(2)]
    return (losses[0] + losses[1]) / 2


@torch.no_grad()
def teacher_forcing_batch(tokenizer: Tokenizer, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (B, 3, H, W) -> target indices (B, 2, P) and folded input (B, P - 1, 2Z)."""
    indices = tokenizer.img_to_indices(img)
    return indices, tokenizer.indices_to_generator_input(indices)


def load_frozen_tokenizer(path: str | Path, device: torch.device) -> tuple[ModelConfig, Tokenizer]:
    """The tokenizer of a checkpoint (``load_checkpoint_models``), in eval mode, without gradients."""
    from imagefolder.checkpoints import load_checkpoint_models

    config, tokenizer, _ = load_checkpoint_models(Path(path), device=str(device))
    if tokenizer is None:
        raise CheckpointError(f"{path} holds no tokenizer")
    return config, tokenizer.eval().requires_grad_(False)


class GeneratorTrainer(RunTrainer):
    """Owns the models, optimizer and data stream of one run; ``step`` is one optimisation step."""

    kind = "generator"

    def __init__(self, opts: GeneratorTrainConfig, config: ModelConfig, tokenizer: Tokenizer, env: DistEnv) -> None:
        if config.tokenizer != tokenizer.cfg:
            raise InputError("the generator's config names a different tokenizer than the frozen one")
        super().__init__(opts, config, env)
        self.tokenizer = tokenizer.to(env.device)
        torch.manual_seed(opts.seed)  # identical initial weights on every rank
        model: nn.Module = Generator(config.generator).to(env.device).train()
        seed_everything(opts.seed + env.rank)  # then per-rank streams for class dropout
        if env.distributed:
            ids = [env.device] if env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = adamw(model, opts.lr, opts.weight_decay, opts.betas)
        self.dataset = open_dataset(opts.data, config.tokenizer.image_size)
        self.stream = IndexStream(len(self.dataset), opts.seed)
        self.step_count = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of the next global batch: images (b, 3, H, W), labels (b,)."""
        img, labels = collate(self.dataset, shard(self.stream.next_batch(self.opts.batch_size), self.env))
        return img.to(self.env.device), labels.to(self.env.device)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimisation step on ``batch`` (default: the next one); returns this rank's metrics."""
        opts = self.opts
        lr = opts.lr * lr_factor(self.step_count, opts.steps, opts.warmup, "linear", opts.final_lr)
        set_lr(self.optimizer, lr)
        img, labels = batch if batch is not None else self.next_batch()
        indices, x = teacher_forcing_batch(self.tokenizer, img)
        logits = self.model(labels, x)  # (B, P, 2V)
        loss = branch_cross_entropy(logits, indices)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        with torch.no_grad():
            predicted = logits.unflatten(-1, (2, -1)).argmax(-1).transpose(1, 2)  # (B, 2, P)
            acc = (predicted == indices).float()
        return {"loss": loss.item(), "token_acc": acc.mean().item(), "grad_norm": grad_norm.item(), "lr": lr}

    # ----- what state.pt holds, and the export

    def stateful(self) -> dict[str, Any]:
        return {"model": unwrap(self.model), "optimizer": self.optimizer}

    def exported_states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The frozen tokenizer and the trained generator, the pair generation needs."""
        return self.tokenizer.state_dict(), unwrap(self.model).state_dict()


def train_generator(
    opts: GeneratorTrainConfig, env: DistEnv, config: ModelConfig | None = None, progress: bool = True
) -> GeneratorTrainer:
    """Run (or resume) a generator training; returns the trainer at its last step.

    Args:
        opts: the run's options; ``opts.out`` is the run folder.
        env: from ``setup_distributed``.
        config: the model pair; None takes the tokenizer checkpoint's config with its generator part.
        progress: show a progress bar on rank 0.
    """
    tok_config, tokenizer = load_frozen_tokenizer(opts.tokenizer, env.device)
    config = config or tok_config
    trainer = GeneratorTrainer(opts, config, tokenizer, env)
    return run_training(trainer, opts, env, "generator", "model.safetensors", ("loss", "token_acc"), progress)
