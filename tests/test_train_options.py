"""The numeric options of training and evaluation are refused by the library itself (not only by the
command line), naming the option, before anything is trained or written; and a run folder's state
only resumes a run with the same parts."""

from __future__ import annotations

import math

import pytest
import torch

from imagefolder.configs import tiny
from imagefolder.errors import InputError
from imagefolder.train.classifier import train_classifier
from imagefolder.train.common import DistEnv
from imagefolder.train.eval import EvalConfig
from imagefolder.train.generator import GeneratorTrainConfig
from imagefolder.train.state import TrainingStateError
from imagefolder.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer, train_tokenizer


def tokenizer_opts(**kw):
    return TokenizerTrainConfig(out="run", **kw)


def generator_opts(**kw):
    return GeneratorTrainConfig(out="run", tokenizer="tokenizer.safetensors", **kw)


def eval_opts(**kw):
    return EvalConfig(**kw)


BAD = [
    (tokenizer_opts, "steps", -3),
    (tokenizer_opts, "steps", 2.5),
    (tokenizer_opts, "batch_size", 0),
    (tokenizer_opts, "lr", 0.0),
    (tokenizer_opts, "lr", math.inf),
    (tokenizer_opts, "betas", (0.9, 1.0)),
    (tokenizer_opts, "betas", (0.9,)),
    (tokenizer_opts, "warmup", -1),
    (tokenizer_opts, "final_lr", 1.5),
    (tokenizer_opts, "ema_decay", -0.1),
    (tokenizer_opts, "sem_weight", math.nan),
    (tokenizer_opts, "disc_start", -10),
    (tokenizer_opts, "layer_scale_init", 0.0),
    (tokenizer_opts, "seed", -1),
    (tokenizer_opts, "log_every", 0),
    (generator_opts, "weight_decay", -0.05),
    (generator_opts, "grad_clip", 0.0),
    (generator_opts, "save_every", -1),
    (generator_opts, "stop_at", 0),
    (eval_opts, "num_images", 0),
    (eval_opts, "cfg", -1.0),
    (eval_opts, "top_k", 0),
    (eval_opts, "top_p", 1.01),
]


@pytest.mark.parametrize(("make", "name", "value"), BAD, ids=[f"{m.__name__}-{n}={v}" for m, n, v in BAD])
def test_out_of_range_option_is_refused(make, name, value):
    with pytest.raises(InputError, match=rf"^{name} must be .*, got ") as info:
        make(**{name: value})
    assert repr(value) in str(info.value)


def test_defaults_and_edges_are_accepted():
    tokenizer_opts(warmup=0, ema_decay=0.0, disc_weight=0.0, final_lr=1.0, stop_at=None, seed=2**32 - 1)
    generator_opts(steps=1, batch_size=1, warmup=0, weight_decay=0.0, stop_at=1)
    eval_opts(cfg=0.0, top_k=1, top_p=1.0)


def test_classifier_arguments_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "c.safetensors"
    for bad in ({"steps": -3}, {"batch_size": 0}, {"lr": -1.0}, {"eval_count": 0}):
        name = next(iter(bad))
        with pytest.raises(InputError, match=rf"^{name} must be"):
            train_classifier("shapes", out, **bad, progress=False)
    assert not out.exists()


def test_global_batch_must_split_over_the_world(tmp_path):
    opts = TokenizerTrainConfig(out=str(tmp_path / "run"), batch_size=4, perceptual="none", disc_weight=0)
    with pytest.raises(InputError, match="batch_size 4 is not divisible by the world size 3"):
        TokenizerTrainer(opts, tiny(), DistEnv(rank=0, world_size=3))
    assert not (tmp_path / "run").exists()


def test_state_of_a_run_with_other_parts_is_refused(tmp_path):
    """A state saved with a discriminator cannot resume a run without one, and the message says which."""
    base = {
        "out": str(tmp_path),
        "steps": 2,
        "batch_size": 2,
        "perceptual": "none",
        "log_every": 1,
        "save_every": 1,
        "stop_at": 1,
    }
    torch.manual_seed(0)
    train_tokenizer(TokenizerTrainConfig(**base, disc_weight=0.5, disc_start=0), DistEnv(), tiny(), progress=False)
    with pytest.raises(TrainingStateError, match=r"holds .*'disc'.* this run has .*--no-resume"):
        train_tokenizer(TokenizerTrainConfig(**base, disc_weight=0.0), DistEnv(), tiny(), progress=False)
