"""Checkpoints whose tensors are wrong are refused at load, and the refusal names the tensor and the
file: non-finite values, a dtype or shape other than the model's, integer buffers of another kind.
Official files and ours, the classifier too; good files (the mask's -inf, huge finite weights) load."""

from __future__ import annotations

import pytest
import torch

from imagefolder.checkpoints import load_checkpoint_models, save_checkpoint
from imagefolder.configs import tiny
from imagefolder.errors import CheckpointError
from imagefolder.train.classifier import Classifier, ClassifierConfig, load_classifier, save_classifier
from tests.models import randomized
from tests.official_files import official_ar_payload

TOKENIZER_WEIGHT = "quantizes.0.embedding.weight"
GENERATOR_WEIGHT = "blocks.0.attn.proj.weight"


@pytest.fixture(scope="module")
def models():
    return randomized(tiny(), seed=4)


def _with_nan(tensor: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[3] = value
    return tensor


def _official(path, models, part: str, key: str, value: torch.Tensor):
    """An official AR file whose ``part`` ("vae_local" or "var_wo_ddp") holds ``value`` at ``key``."""
    tokenizer, generator = models
    payload = official_ar_payload(tiny(), generator, tokenizer)
    payload["trainer"][part][key] = value
    torch.save(payload, path)
    return path


def _ours(path, models, part: str, key: str, value: torch.Tensor):
    """Our checkpoint whose ``part`` ("tokenizer" or "generator") holds ``value`` at ``key``."""
    states = {"tokenizer": models[0].state_dict(), "generator": models[1].state_dict()}
    states[part] = {**states[part], key: value}
    return save_checkpoint(path, tiny(), states["tokenizer"], states["generator"])


def _refused(path, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_models(path)
    text = str(info.value)
    assert str(path) in text, text
    for word in words:
        assert word in text, text
    return text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused(tmp_path, models, value):
    gen_weight = _with_nan(models[1].state_dict()[GENERATOR_WEIGHT], value)
    tok_weight = _with_nan(models[0].state_dict()[TOKENIZER_WEIGHT], value)
    text = _refused(
        _official(tmp_path / "ar.pth", models, "var_wo_ddp", GENERATOR_WEIGHT, gen_weight),
        f"generator tensor '{GENERATOR_WEIGHT}'",
        "1 NaN or infinite value",
    )
    assert "another checkpoint" in text  # says what to do
    _refused(
        _official(tmp_path / "tok.pth", models, "vae_local", TOKENIZER_WEIGHT, tok_weight),
        f"tokenizer tensor '{TOKENIZER_WEIGHT}'",
    )
    _refused(
        _ours(tmp_path / "m.safetensors", models, "generator", GENERATOR_WEIGHT, gen_weight),
        f"generator tensor '{GENERATOR_WEIGHT}'",
    )


def test_non_finite_float_buffer_is_refused(tmp_path, models):
    key = "quantizes.1.ema_vocab_hit_SV"
    bad = _with_nan(models[0].state_dict()[key])
    _refused(_ours(tmp_path / "m.safetensors", models, "tokenizer", key, bad), f"tokenizer tensor '{key}'", "NaN")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64], ids=["fp16", "fp64", "int64"])
def test_weight_of_another_dtype_is_refused(tmp_path, models, dtype):
    weight = models[1].state_dict()[GENERATOR_WEIGHT].to(dtype)
    for path in (
        _official(tmp_path / "ar.pth", models, "var_wo_ddp", GENERATOR_WEIGHT, weight),
        _ours(tmp_path / "m.safetensors", models, "generator", GENERATOR_WEIGHT, weight),
    ):
        _refused(path, f"generator tensor '{GENERATOR_WEIGHT}'", str(dtype), "torch.float32")


@pytest.mark.parametrize(
    ("part", "key", "dtype"),
    [("var_wo_ddp", "lvl_1L", torch.float32), ("vae_local", "encoder.lvl1LC", torch.int32)],
    ids=["float-level-buffer", "int32-level-buffer"],
)
def test_integer_buffer_of_another_kind_is_refused(tmp_path, models, part, key, dtype):
    """Right values, wrong kind: ``load_state_dict`` would cast them silently."""
    model = models[1] if part == "var_wo_ddp" else models[0]
    value = model.state_dict()[key].to(dtype)
    _refused(_official(tmp_path / "ar.pth", models, part, key, value), f"buffer '{key}'", str(dtype), "torch.int64")


def test_wrong_shape_is_refused_in_our_format(tmp_path, models):
    path = _ours(tmp_path / "m.safetensors", models, "generator", "head.bias", torch.zeros(3))
    _refused(path, "generator tensor 'head.bias'", "expected shape (512,), found (3,)")


def test_good_files_load(tmp_path, models):
    """The mask's -inf is expected, and finite weights whose sum overflows float32 are finite."""
    huge = torch.full_like(models[1].state_dict()[GENERATOR_WEIGHT], 3e38)
    assert not torch.isfinite(huge.sum())
    for path in (
        _official(tmp_path / "ar.pth", models, "var_wo_ddp", GENERATOR_WEIGHT, huge),
        _ours(tmp_path / "m.safetensors", models, "generator", GENERATOR_WEIGHT, huge),
    ):
        _, tokenizer, generator = load_checkpoint_models(path)
        assert torch.equal(generator.state_dict()[GENERATOR_WEIGHT], huge)
        assert torch.isinf(generator.attn_bias_for_masking).any()


def test_classifier_with_nan_weights_is_refused(tmp_path):
    model = Classifier(ClassifierConfig(width=8))
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    path = tmp_path / "judge.safetensors"
    save_classifier(path, model)
    with pytest.raises(CheckpointError, match=r"classifier tensor 'head.weight' holds 1 NaN") as info:
        load_classifier(path)
    assert str(path) in str(info.value)
