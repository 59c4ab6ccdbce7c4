"""What the trainers share: distributed setup, the data stream, EMA, the LR schedule, the metrics log
and the training loop. What a run keeps on disk (training state, export) is ``imagefolder.train.state``.

Distributed runs use ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``):
gloo on CPU, nccl on GPU. Every rank draws the same global batch of indices from ``IndexStream`` and
keeps its contiguous shard, so a W-process run sees exactly the batch a 1-process run would see.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from imagefolder.errors import InputError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistEnv:
    """Join the process group described by the launcher's environment (torchrun), if any.

    Args:
        device: "cpu", "cuda" or None (CUDA when available).
    Returns:
        The rank, world size and this rank's device. A single process needs no environment.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; for logging)."""
    value = value.detach().clone()
    if env.distributed:
        dist.all_reduce(value)
        value /= env.world_size
    return value


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# Data stream
# ---------------------------------------------------------------------------------------------


class IndexStream:
    """Endless shuffled epochs over ``range(length)``, resumable from one counter.

    Epoch e is ``randperm(length)`` from a generator seeded with (seed, e), so the whole stream is a
    function of ``consumed`` and no generator state has to be saved.
    """

    def __init__(self, length: int, seed: int, consumed: int = 0) -> None:
        if length <= 0:
            raise ValueError("cannot stream an empty dataset")
        self.length, self.seed, self.consumed = length, seed, consumed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.length, generator=gen)
        return self._perm

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` indices (LongTensor), crossing epoch boundaries as needed."""
        out: list[int] = []
        while len(out) < batch_size:
            epoch, pos = divmod(self.consumed, self.length)
            take = min(batch_size - len(out), self.length - pos)
            out.extend(self._permutation(epoch)[pos : pos + take].tolist())
            self.consumed += take
        return torch.tensor(out, dtype=torch.long)


def check_global_batch(batch_size: int, env: DistEnv) -> None:
    """Refuse a global batch that the ranks cannot split evenly (each rank takes an equal shard)."""
    if batch_size % env.world_size:
        raise InputError(
            f"batch_size {batch_size} is not divisible by the world size {env.world_size}: the batch is global, "
            f"split evenly over the processes; use a multiple of {env.world_size}"
        )


def shard(indices: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (the global batch must divide evenly)."""
    check_global_batch(len(indices), env)
    per = len(indices) // env.world_size
    return indices[env.rank * per : (env.rank + 1) * per]


# ---------------------------------------------------------------------------------------------
# EMA and learning rate
# ---------------------------------------------------------------------------------------------


class ModelEMA:
    """Exponential moving average of a model's parameters; buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        for ema_p, p in zip(self.model.parameters(), src.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - self.decay)
        for ema_b, b in zip(self.model.buffers(), src.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", final: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    1. linear warm-up from 1/warmup to 1 over ``warmup`` steps;
    2. then ``cosine`` or ``linear`` decay from 1 to ``final`` at ``total``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - (1 - final) * progress
    raise InputError(f"unknown schedule {kind!r}: use cosine or linear")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms, embeddings of shape (1, ...) excluded)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in unwrap(model).named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and p.shape[0] > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """JSON-lines metrics (``metrics.jsonl`` in the run folder), mirrored to TensorBoard when installed.

    Only rank 0 writes. Appends, so a resumed run continues the same file.
    """

    def __init__(self, run_dir: str | Path, env: DistEnv, tensorboard: bool = True) -> None:
        self.enabled = env.is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.start = time.time()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.path.parent / "tb"))
            except ImportError:
                log.debug("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self.start, 2), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run_training(
    trainer, opts, env: DistEnv, desc: str, export_name: str, show: tuple[str, ...], progress: bool = True
):
    """The loop both trainers share: resume, step until ``opts.steps`` (or ``opts.stop_at``), log,
    save every ``opts.save_every`` steps, and export ``export_name`` when the schedule is complete.

    ``trainer`` is a ``imagefolder.train.state.RunTrainer`` with ``step() -> metrics row``; ``show``
    names the row entries shown on the progress bar.
    """
    from tqdm import tqdm

    if opts.resume:
        trainer.resume()
    metrics = MetricsLog(opts.out, env)
    last = opts.steps if opts.stop_at is None else min(opts.steps, opts.stop_at)
    bar = tqdm(total=opts.steps, initial=trainer.step_count, disable=not (progress and env.is_main), desc=desc)
    while trainer.step_count < last:
        row = trainer.step()
        bar.update(1)
        step = trainer.step_count
        if step % opts.log_every == 0 or step == last:
            row["loss"] = all_reduce_mean(torch.tensor(row["loss"]), env).item()
            metrics.log(step, row)
            bar.set_postfix({key: f"{row[key]:.4f}" for key in show})
        if step % opts.save_every == 0 or step == last:
            trainer.save()
    bar.close()
    metrics.close()
    if trainer.step_count >= opts.steps and env.is_main:
        trainer.export(Path(opts.out) / export_name)
    return trainer
