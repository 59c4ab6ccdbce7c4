"""Bad checkpoints and bad training options through the command line, one test per kind of input.

Every refusal must be: exit code 1, exactly one ``Error:`` line naming the culprit (the tensor, the
option, the file), no traceback, no output written, and a previous good output left byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from imagefolder.checkpoints import convert, save_checkpoint
from imagefolder.cli.main import main
from imagefolder.configs import tiny
from imagefolder.train.classifier import Classifier, ClassifierConfig, save_classifier
from tests.models import randomized
from tests.official_files import official_ar_payload

WEIGHT = "blocks.0.attn.proj.weight"


class Marker:
    """A class outside the unpickling allow-list."""


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """Good files: an official AR checkpoint, ours, and outputs made from them (the "previous" outputs)."""
    root = tmp_path_factory.mktemp("good")
    tokenizer, generator = randomized(tiny(), seed=6)
    official = root / "ar-ckpt-last.pth"
    torch.save(official_ar_payload(tiny(), generator, tokenizer), official)
    ours = save_checkpoint(root / "model.safetensors", tiny(), tokenizer.state_dict(), generator.state_dict())
    converted = convert(official, root / "converted.safetensors")
    image = root / "image.png"
    _invoke(["generate", "--checkpoint", ours, "--backend", "torch", "--class", "1", "-o", image])
    classifier = root / "classifier.safetensors"
    save_classifier(classifier, Classifier(ClassifierConfig(width=8)))
    return {"official": official, "ours": ours, "converted": converted, "image": image, "classifier": classifier}


def _invoke(args: list) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _refused(args: list, *culprits: str) -> str:
    """Run a command that must be refused; returns its one error line."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    output = result.output
    assert result.exit_code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output, output
    for culprit in culprits:
        assert culprit in errors[0], errors[0]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: an official file refused by `convert`, ours by `generate`
# ---------------------------------------------------------------------------------------------


def _official_with(good, path: Path, key: str, value: torch.Tensor) -> Path:
    payload = torch.load(good["official"], weights_only=False)
    payload["trainer"]["var_wo_ddp"][key] = value
    torch.save(payload, path)
    return path


def _ours_with(good, path: Path, key: str, value: torch.Tensor) -> Path:
    tokenizer, generator = randomized(tiny(), seed=6)
    return save_checkpoint(path, tiny(), tokenizer.state_dict(), {**generator.state_dict(), key: value})


def _assert_refused(good, tmp_path: Path, bad: Path, *culprits: str) -> None:
    """``bad`` is refused, naming it and the culprits, writing nothing and keeping the previous output."""
    out = tmp_path / "out"
    out.mkdir()
    if bad.suffix == ".safetensors":  # ours: generation with the PyTorch reference
        (out / "out.png").write_bytes(good["image"].read_bytes())
        commands = [
            ["generate", "--checkpoint", bad, "--backend", "torch", "-o", out / name] for name in ("out.png", "new.png")
        ]
    else:  # official: conversion to ours
        for made in (good["converted"], good["converted"].with_suffix(".json")):
            (out / made.name).write_bytes(made.read_bytes())
        commands = [["convert", bad, out / name] for name in ("converted.safetensors", "new.safetensors")]
    before = _snapshot(out)
    for command in commands:  # over a previous output, then to a new path
        _refused(command, str(bad), *culprits)
    assert _snapshot(out) == before


@pytest.mark.parametrize("kind", ["official", "ours"])
def test_non_finite_weights(good, tmp_path, kind):
    weight = randomized(tiny(), seed=6)[1].state_dict()[WEIGHT].clone()
    weight[0, 0] = float("nan")
    write = _official_with if kind == "official" else _ours_with
    bad = write(good, tmp_path / ("bad.pth" if kind == "official" else "bad.safetensors"), WEIGHT, weight)
    _assert_refused(good, tmp_path, bad, f"'{WEIGHT}'", "NaN")


@pytest.mark.parametrize("kind", ["official", "ours"])
def test_weight_of_wrong_dtype(good, tmp_path, kind):
    weight = randomized(tiny(), seed=6)[1].state_dict()[WEIGHT].to(torch.float16)
    write = _official_with if kind == "official" else _ours_with
    bad = write(good, tmp_path / ("bad.pth" if kind == "official" else "bad.safetensors"), WEIGHT, weight)
    _assert_refused(good, tmp_path, bad, f"'{WEIGHT}'", "torch.float16", "torch.float32")


@pytest.mark.parametrize("kind", ["official", "ours"])
def test_weight_of_wrong_shape(good, tmp_path, kind):
    write = _official_with if kind == "official" else _ours_with
    bad = write(good, tmp_path / ("bad.pth" if kind == "official" else "bad.safetensors"), "head.bias", torch.zeros(3))
    _assert_refused(good, tmp_path, bad, "'head.bias'", "expected shape (512,), found (3,)")


def test_untrusted_pickle(good, tmp_path):
    payload = torch.load(good["official"], weights_only=False)
    payload["args"]["hook"] = Marker()
    bad = tmp_path / "bad.pth"
    torch.save(payload, bad)
    _assert_refused(good, tmp_path, bad, f"{Marker.__module__}.Marker", "--trust-checkpoint")


@pytest.mark.parametrize("kind", ["official", "ours"])
def test_truncated_file(good, tmp_path, kind):
    data = good[kind].read_bytes()
    bad = tmp_path / ("bad.pth" if kind == "official" else "bad.safetensors")
    bad.write_bytes(data[: len(data) * 2 // 3])
    _assert_refused(good, tmp_path, bad, "truncated")


# ---------------------------------------------------------------------------------------------
# Bad numeric options of training and evaluation
# ---------------------------------------------------------------------------------------------

TRAIN_OPTIONS = [
    ("classifier", ["--steps", "-3"], "steps"),
    ("classifier", ["--lr", "nan"], "lr"),
    ("tokenizer", ["--steps", "0"], "steps"),
    ("tokenizer", ["--batch-size", "0"], "batch_size"),
    ("tokenizer", ["--warmup", "-1"], "warmup"),
    ("tokenizer", ["--ema-decay", "1"], "ema_decay"),
    ("tokenizer", ["--disc-weight", "-0.5"], "disc_weight"),
    ("tokenizer", ["--save-every", "0"], "save_every"),
    ("generator", ["--lr", "0"], "lr"),
    ("generator", ["--stop-at", "0"], "stop_at"),
    ("generator", ["--grad-clip", "-1"], "grad_clip"),
    ("eval", ["-n", "0"], "num_images"),
    ("eval", ["--top-p", "0"], "top_p"),
    ("eval", ["--top-k", "-5"], "top_k"),
]


@pytest.mark.parametrize(
    ("command", "options", "culprit"), TRAIN_OPTIONS, ids=[f"{c}{'-'.join(o)}" for c, o, _ in TRAIN_OPTIONS]
)
def test_out_of_range_training_options(good, tmp_path, command, options, culprit):
    """Refused before anything runs: the run folder (or output file) keeps its previous export."""
    out = tmp_path / "out"
    out.mkdir()
    if command == "classifier":
        previous = out / "classifier.safetensors"
        previous.write_bytes(good["classifier"].read_bytes())
        args = ["train", "classifier", "-o", previous]
    elif command == "eval":
        previous = out / "eval.json"
        previous.write_text('{"previous": true}\n')
        args = ["eval", "-c", good["ours"], "--json-out", previous]
    else:  # a run folder holding the export of an earlier run
        previous = out / ("tokenizer.safetensors" if command == "tokenizer" else "model.safetensors")
        previous.write_bytes(good["ours"].read_bytes())
        args = ["train", command, "-o", out] + (["--tokenizer", good["ours"]] if command == "generator" else [])
    before = _snapshot(out)
    error = _refused(args + options, culprit)
    assert options[-1] in error  # the value given
    assert _snapshot(out) == before
