"""Generator trainer: the loss falls on a fixed batch, 2-process DDP equals 1 process on the
concatenated batch, resume is bit-identical, and a corrupted training state fails clearly."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from imagefolder.checkpoints import save_checkpoint
from imagefolder.configs import ModelConfig, tiny
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.train.common import DistEnv, cleanup_distributed, setup_distributed
from imagefolder.train.generator import GeneratorTrainConfig, GeneratorTrainer, load_frozen_tokenizer, train_generator
from imagefolder.train.state import TrainingStateError, load_training_state


def _small_config(cond_drop: float = 0.1) -> ModelConfig:
    cfg = tiny()
    gen = dataclasses.replace(cfg.generator, depth=2, cond_drop=cond_drop)
    return dataclasses.replace(cfg, generator=gen)


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = tiny()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.safetensors"
    save_checkpoint(path, cfg, Tokenizer(cfg.tokenizer).state_dict(), None)
    return path


def _opts(out: Path, tokenizer: Path, **kw) -> GeneratorTrainConfig:
    base = {"steps": 6, "batch_size": 8, "warmup": 2, "log_every": 1, "save_every": 100}
    return GeneratorTrainConfig(out=str(out), tokenizer=str(tokenizer), **{**base, **kw})


def test_loss_falls_on_fixed_batch(tmp_path, tokenizer_ckpt):
    _, tok = load_frozen_tokenizer(tokenizer_ckpt, torch.device("cpu"))
    trainer = GeneratorTrainer(_opts(tmp_path, tokenizer_ckpt, steps=100, lr=3e-3), _small_config(0.0), tok, DistEnv())
    batch = trainer.next_batch()
    losses = [trainer.step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < losses[0] - 0.5, losses


def test_resume_is_bit_identical(tmp_path, tokenizer_ckpt):
    config = _small_config(0.1)  # class dropout draws from the RNG: the restored state must match
    straight = train_generator(_opts(tmp_path / "a", tokenizer_ckpt), DistEnv(), config, progress=False)
    train_generator(_opts(tmp_path / "b", tokenizer_ckpt, stop_at=3), DistEnv(), config, progress=False)
    assert load_training_state(tmp_path / "b" / "state.pt")["step"] == 3
    resumed = train_generator(_opts(tmp_path / "b", tokenizer_ckpt), DistEnv(), config, progress=False)
    assert resumed.step_count == straight.step_count == 6
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") == 6


def test_corrupted_state_fails_clearly(tmp_path, tokenizer_ckpt):
    train_generator(_opts(tmp_path, tokenizer_ckpt, steps=1), DistEnv(), _small_config(), progress=False)
    state = tmp_path / "state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    with pytest.raises(TrainingStateError, match="corrupted"):
        load_training_state(state)
    state.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(TrainingStateError, match="corrupted"):
        train_generator(_opts(tmp_path, tokenizer_ckpt, steps=2), DistEnv(), _small_config(), progress=False)
    state.write_bytes(b"not a state")
    with pytest.raises(TrainingStateError, match="not an imagefolder training state"):
        load_training_state(state)


# ----- DistributedDataParallel: 2 processes == 1 process on the concatenated batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out: str, tokenizer: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    env = setup_distributed("cpu")
    try:
        trainer = train_generator(_opts(Path(out), Path(tokenizer), steps=3), env, _small_config(0.0), progress=False)
        if env.is_main:
            torch.save(trainer.model.module.state_dict(), result)
    finally:
        cleanup_distributed()


def test_ddp_two_processes_match_one(tmp_path, tokenizer_ckpt):
    # Class dropout is off: the two layouts draw different random numbers for it.
    torch.set_num_threads(1)
    single = train_generator(
        _opts(tmp_path / "one", tokenizer_ckpt, steps=3), DistEnv(), _small_config(0.0), progress=False
    )
    result = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two"), str(tokenizer_ckpt), str(result)), nprocs=2)
    ddp_state = torch.load(result, weights_only=True)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, atol=1e-5, rtol=0, msg=name)
    assert not torch.equal(ddp_state["head.weight"], _fresh_head(tokenizer_ckpt)), "the parameters did not move"


def _fresh_head(tokenizer_ckpt: Path) -> torch.Tensor:
    from imagefolder.models.generator import Generator

    torch.manual_seed(0)
    return Generator(_small_config().generator).head.weight.detach()
