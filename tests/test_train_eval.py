"""Evaluation and the classifier: file round trip, clear errors, the eval command's plumbing, and the
shipped default model's quality (class accuracy of ≥ 100 generated images)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from imagefolder.checkpoints import save_checkpoint
from imagefolder.configs import tiny
from imagefolder.data import ShapesDataset
from imagefolder.default_model import default_weights_path
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.train.classifier import (
    Classifier,
    ClassifierConfig,
    ClassifierError,
    default_classifier_path,
    load_classifier,
    save_classifier,
    train_classifier,
)
from imagefolder.train.eval import evaluate_generation


def test_classifier_trains_saves_and_loads(tmp_path):
    path = tmp_path / "c.safetensors"
    model, accuracy = train_classifier(
        "shapes", path, steps=30, batch_size=20, config=ClassifierConfig(width=8), progress=False, eval_count=100
    )
    assert accuracy > 0.2  # well above chance (0.1) after 30 steps
    loaded = load_classifier(path)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))


def test_classifier_errors(tmp_path):
    with pytest.raises(ClassifierError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ClassifierError, match="cannot read"):
        load_classifier(bad)


def test_eval_command_on_a_random_model(tmp_path):
    from imagefolder.cli.train import eval_command

    torch.manual_seed(0)
    cfg = tiny()
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, cfg, Tokenizer(cfg.tokenizer).state_dict(), Generator(cfg.generator).state_dict())
    judge = tmp_path / "c.safetensors"
    save_classifier(judge, Classifier(ClassifierConfig(width=8)))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        eval_command, ["-c", str(ckpt), "--classifier", str(judge), "-n", "20", "--json-out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["reconstruction"]["images"] == 20 and metrics["reconstruction"]["psnr_db"] > 0
    assert 0 <= metrics["generation"]["class_accuracy"] <= 1
    assert metrics["generation"]["classifier_frechet_distance"] >= 0


@pytest.mark.skipif(not default_weights_path().is_file(), reason="default model weights not built yet")
def test_default_model_class_accuracy():
    from imagefolder.checkpoints import load_checkpoint_models

    _, tokenizer, generator = load_checkpoint_models(default_weights_path())
    judge = load_classifier(default_classifier_path())
    metrics = evaluate_generation(generator.eval(), tokenizer.eval(), judge, ShapesDataset(64, seed=1_000_003), 100)
    assert metrics["class_accuracy"] >= 0.80, metrics
