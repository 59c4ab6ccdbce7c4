"""Checkpoint I/O: official layouts (AR, tokenizer, bare state dict) with their strict-loading pitfalls,
the pickle allow-list (ruamel-yaml stand-ins, unknown globals), damaged files, and our atomic
safetensors format. Everything runs on the tiny config except one official-width, depth-2 generator."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from imagefolder.checkpoints import (
    convert,
    load_checkpoint_models,
    native,
    read_checkpoint,
    read_official,
    save_checkpoint,
    sidecar_path,
)
from imagefolder.checkpoints.infer import infer_config
from imagefolder.checkpoints.native import FORMAT
from imagefolder.checkpoints.unpickle import YamlFloat, YamlInt, YamlMap, YamlSeq, YamlStr, plain, safe_load
from imagefolder.configs import PRESETS, ModelConfig, official, tiny
from imagefolder.errors import CheckpointError
from imagefolder.io import atomic_write
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer
from tests.official_files import (
    official_ar_payload,
    official_tokenizer_payload,
    write_official_ar_checkpoint,
    write_official_tokenizer_checkpoint,
)
from tests.reference import official_keys


class Marker:
    """A class outside the allow-list, pickled into a checkpoint's args."""

    def __init__(self, tag: str = "hook") -> None:
        self.tag = tag


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every floating parameter with seeded noise so two models are told apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


@pytest.fixture(scope="module")
def models() -> tuple[Tokenizer, Generator]:
    cfg = tiny()
    return _randomize(Tokenizer(cfg.tokenizer), 1), _randomize(Generator(cfg.generator), 2)


def _assert_same(expected: torch.nn.Module | dict, loaded: torch.nn.Module | dict) -> None:
    want = expected if isinstance(expected, dict) else expected.state_dict()
    got = loaded if isinstance(loaded, dict) else loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def _save_ar(path: Path, models, edit=None) -> Path:
    """Official AR layout, optionally edited (``edit(payload)``) before saving."""
    tok, gen = models
    payload = official_ar_payload(tiny(), gen, tok)
    if edit is not None:
        edit(payload)
    torch.save(payload, path)
    return path


# ---------------------------------------------------------------------------------------------
# Official layouts
# ---------------------------------------------------------------------------------------------


def test_official_ar_layout_round_trip(tmp_path, models):
    path = write_official_ar_checkpoint(tmp_path / "ar-ckpt-last.pth", tiny(), models[1], models[0])
    config, tok, gen = load_checkpoint_models(path)
    assert config == tiny()
    assert not tok.training and not gen.training
    _assert_same(models[0], tok)
    _assert_same(models[1], gen)
    meta = read_official(path).meta
    assert meta["layout"] == "ar" and meta["epoch"] == 350
    assert meta["trainer_config"]["patch_nums"] == tiny().generator.scales


def test_tokenizer_layout_prefers_ema(tmp_path, models):
    cfg = tiny()
    ema = _randomize(Tokenizer(cfg.tokenizer), 3)
    path = write_official_tokenizer_checkpoint(tmp_path / "best_ckpt.pt", models[0], ema=ema)
    config, tok, gen = load_checkpoint_models(path)
    assert config == cfg and gen is None
    _assert_same(ema, tok)
    assert read_official(path).meta["weights"] == "ema"
    # Without EMA weights the plain model is taken.
    path = write_official_tokenizer_checkpoint(tmp_path / "no-ema.pt", models[0])
    _assert_same(models[0], load_checkpoint_models(path)[1])


def test_padded_attn_bias_and_wrapper_prefixes(tmp_path, models):
    def edit(payload):
        trainer = payload["trainer"]
        bias = trainer["var_wo_ddp"]["attn_bias_for_masking"]
        trainer["var_wo_ddp"]["attn_bias_for_masking"] = F.pad(bias, (0, 2, 0, 2))  # as xformers builds store it
        trainer["var_wo_ddp"] = {f"module.{k}": v for k, v in trainer["var_wo_ddp"].items()}
        trainer["vae_local"] = {f"_orig_mod.{k}": v for k, v in trainer["vae_local"].items()}

    _, tok, gen = load_checkpoint_models(_save_ar(tmp_path / "ar.pth", models, edit))
    _assert_same(models[0], tok)
    _assert_same(models[1], gen)
    positions = tiny().generator.positions
    assert gen.attn_bias_for_masking.shape == (1, 1, positions, positions)


def test_official_width_generator_bare_state_dict(tmp_path):
    """Depth-2 generator at the official width: config inferred from shapes alone (P=286 → official
    scales), 288×288 mask and ``module.`` prefix accepted."""
    gen_cfg = dataclasses.replace(official().generator, depth=2, drop_path=0.1 * 2 / 24)
    torch.manual_seed(0)
    generator = Generator(gen_cfg)
    state = generator.state_dict()
    state["attn_bias_for_masking"] = F.pad(state["attn_bias_for_masking"], (0, 2, 0, 2), value=float("-inf"))
    assert state["attn_bias_for_masking"].shape == (1, 1, 288, 288)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "var.pth")
    config, tok, gen = load_checkpoint_models(tmp_path / "var.pth")
    assert tok is None
    assert config.generator == gen_cfg
    assert config.tokenizer == official().tokenizer
    _assert_same(generator, gen)


def test_infer_config_from_official_key_listing():
    """The shapes of the real official state dicts (the reference listing) give the d17 preset."""

    def meta_state(section):
        dtypes = {"torch.float32": torch.float32, "torch.int64": torch.int64}
        return {k: torch.empty(shape, dtype=dtypes[dt], device="meta") for k, shape, dt in official_keys(section)}

    tok, gen = meta_state("VAE"), meta_state("VAR")
    assert infer_config(tok, gen) == PRESETS["imagefolder-d17"]
    assert infer_config(tok, None).name == infer_config(None, gen).name == "imagefolder-d17"
    with torch.device("meta"):
        cfg = official(8192)
        assert infer_config(Tokenizer(cfg.tokenizer).state_dict(), None) == cfg


def test_non_official_scales_need_a_config(tmp_path, models):
    torch.save(models[1].state_dict(), tmp_path / "gen.pth")
    with pytest.raises(CheckpointError, match="pass a config"):
        load_checkpoint_models(tmp_path / "gen.pth")
    config, tok, gen = load_checkpoint_models(tmp_path / "gen.pth", config=tiny())
    assert tok is None
    _assert_same(models[1], gen)


# ---------------------------------------------------------------------------------------------
# Mismatches and damaged files
# ---------------------------------------------------------------------------------------------


def _rename(part: str, old: str, new: str):
    def edit(payload):
        state = payload["trainer"][part]
        state[new] = state.pop(old)

    return edit


def _replace(part: str, key: str, value: torch.Tensor):
    def edit(payload):
        payload["trainer"][part][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_rename("var_wo_ddp", "blocks.1.ffn.fc2.bias", "blocks.1.ffn.fc2.b"), "missing key 'blocks.1.ffn.fc2.bias'"),
        (_rename("vae_local", "decoder.mask_token", "decoder.mask_tokens"), "missing key 'decoder.mask_token'"),
        (_replace("var_wo_ddp", "extra.weight", torch.zeros(3)), "unexpected key 'extra.weight'"),
        (
            _replace("var_wo_ddp", "blocks.0.ffn.fc1.bias", torch.zeros(7)),
            r"'blocks.0.ffn.fc1.bias' expected shape \(512,\), found \(7,\)",
        ),
        (_replace("vae_local", "quant_conv.bias", torch.zeros(2, 16)), r"'quant_conv.bias' expected shape \(16,\)"),
        (_replace("var_wo_ddp", "lvl_1L", torch.zeros(1, 66, dtype=torch.long)), "buffer 'lvl_1L'"),
        (_replace("vae_local", "encoder.lvl1LC", torch.zeros(1, 66 + 72 + 1, dtype=torch.long)), "'encoder.lvl1LC'"),
    ],
    ids=["renamed-gen", "renamed-tok", "unexpected", "shape-gen", "shape-tok", "derived-lvl", "derived-lvl1LC"],
)
def test_mismatch_names_the_key(tmp_path, models, edit, message):
    path = _save_ar(tmp_path / "bad.pth", models, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint_models(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(tmp_path, models, keep):
    path = _save_ar(tmp_path / "ar.pth", models)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint") as info:
        load_checkpoint_models(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"not a checkpoint\n"], ids=["random", "empty", "text"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        load_checkpoint_models(path)


def test_missing_file(tmp_path):
    for name in ("nope.pth", "nope.safetensors"):
        with pytest.raises(CheckpointError, match="no such file"):
            load_checkpoint_models(tmp_path / name)


def test_unknown_global_needs_trust(tmp_path, models):
    def edit(payload):
        payload["args"]["hook"] = Marker()

    path = _save_ar(tmp_path / "ar.pth", models, edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_models(path)
    text = str(info.value)
    assert f"{Marker.__module__}.Marker" in text
    assert "trust_checkpoint=True" in text and "--trust-checkpoint" in text
    checkpoint = read_official(path, trust_checkpoint=True)
    assert isinstance(checkpoint.meta["args"]["hook"], Marker)
    _assert_same(models[1], checkpoint.generator_state)


class Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_code_execution_is_refused(tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": models[0].state_dict(), "args": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle global '(posix|nt|os)\.system'"):
        read_official(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_legacy_pickle_format(tmp_path, models):
    payload = official_ar_payload(tiny(), models[1], models[0])
    torch.save(payload, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _, tok, gen = load_checkpoint_models(tmp_path / "legacy.pth")
    _assert_same(models[0], tok)
    _assert_same(models[1], gen)


# ---------------------------------------------------------------------------------------------
# ruamel-yaml args
# ---------------------------------------------------------------------------------------------

OFFICIAL_STYLE_YAML = """\
# MSVR10P2-style tokenizer config (tiny sizes)
image_size: 64        # px
vq_model: VQ-16
codebook_size: 256
codebook_embed_dim: 16
product_quant: 2
v_patch_nums: [1, 2, 3, 4, 6]  # scales
lr: 3.0e-5
sem_loss_weight: 0.1
half_sem: true
ema: True
disc_epoch_start: 0x38
encoder_model: 'vit_base_patch14_dinov2.lvd142m'
note: |
  literal block
schedule:
  warmup: 1.0e-6   # inline comment
  # a comment line
  milestones:
  - 10   # item comment
  - 20
"""

OFFICIAL_STYLE_VALUES = {
    "image_size": 64,
    "vq_model": "VQ-16",
    "codebook_size": 256,
    "codebook_embed_dim": 16,
    "product_quant": 2,
    "v_patch_nums": [1, 2, 3, 4, 6],
    "lr": 3e-5,
    "sem_loss_weight": 0.1,
    "half_sem": True,
    "ema": True,
    "disc_epoch_start": 56,
    "encoder_model": "vit_base_patch14_dinov2.lvd142m",
    "note": "literal block\n",
    "schedule": {"warmup": 1e-6, "milestones": [10, 20]},
}


def test_ruamel_args_load_with_stand_ins(tmp_path, models, monkeypatch):
    yaml = pytest.importorskip("ruamel.yaml")
    loader = yaml.YAML()  # round-trip: CommentedSeq/Map, ScalarFloat, HexInt, comments ...
    loader.preserve_quotes = True
    args = argparse.Namespace(**loader.load(OFFICIAL_STYLE_YAML))
    assert type(args.v_patch_nums).__module__ == "ruamel.yaml.comments"
    path = tmp_path / "best_ckpt.pt"
    torch.save(official_tokenizer_payload(models[0], args=args), path)

    # As on a machine without ruamel: nothing may import it.
    for name in [m for m in sys.modules if m == "ruamel" or m.startswith("ruamel.")]:
        monkeypatch.setitem(sys.modules, name, None)
    raw = safe_load(path)["args"]
    assert isinstance(raw, argparse.Namespace)
    assert type(raw.v_patch_nums) is YamlSeq
    assert type(raw.schedule) is YamlMap and type(raw.schedule["milestones"]) is YamlSeq
    assert type(raw.lr) is YamlFloat and type(raw.disc_epoch_start) is YamlInt
    assert type(raw.encoder_model) is YamlStr and type(raw.note) is YamlStr
    assert all(not type(v).__module__.startswith("ruamel") for v in vars(raw).values())
    assert plain(raw) == OFFICIAL_STYLE_VALUES

    checkpoint = read_official(path)  # the tiny scales come from args.v_patch_nums
    assert checkpoint.config == tiny()
    assert checkpoint.meta["args"] == OFFICIAL_STYLE_VALUES
    _assert_same(models[0], load_checkpoint_models(path)[1])


# ---------------------------------------------------------------------------------------------
# Our safetensors format
# ---------------------------------------------------------------------------------------------


def test_safetensors_round_trip_bit_exact(tmp_path, models):
    tok_state, gen_state = models[0].state_dict(), models[1].state_dict()
    # Shared and non-contiguous tensors, which safetensors refuses unless copied.
    gen_state["head.weight"] = gen_state["head.weight"].t().contiguous().t()
    tok_state["decoder.model.cls_token"] = tok_state["encoder.model.cls_token"]
    path = save_checkpoint(tmp_path / "model.safetensors", tiny(), tok_state, gen_state, {"note": "x", "step": 5})
    config, tok_loaded, gen_loaded = read_checkpoint(path)
    assert config == tiny()
    _assert_same(tok_state, tok_loaded)
    _assert_same(gen_state, gen_loaded)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert ModelConfig.from_dict(sidecar["config"]) == tiny() and sidecar["meta"] == {"note": "x", "step": "5"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]

    gen_only = save_checkpoint(tmp_path / "gen.safetensors", tiny(), None, models[1].state_dict())
    config, tok, gen = load_checkpoint_models(gen_only)
    assert tok is None and not gen.training
    _assert_same(models[1], gen)


def test_convert_official_to_ours(tmp_path, models):
    src = write_official_ar_checkpoint(tmp_path / "ar-ckpt-last.pth", tiny(), models[1], models[0])
    dst = convert(src, tmp_path / "out" / "tiny.safetensors")
    assert sidecar_path(dst).is_file()
    config, tok, gen = load_checkpoint_models(dst)
    assert config == tiny()
    _assert_same(models[0], tok)
    _assert_same(models[1], gen)


def test_format_version_mismatch(tmp_path):
    meta = {"format": FORMAT, "format_version": "2", "config": json.dumps(tiny().to_dict())}
    save_file({"generator.x": torch.zeros(1)}, tmp_path / "future.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="format_version '2' is not supported"):
        read_checkpoint(tmp_path / "future.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not an imagefolder-checkpoint file"):
        load_checkpoint_models(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_atomic_write_keeps_destination_on_failure(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_write(dest) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer failed")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]

    with pytest.raises(FileNotFoundError), atomic_write(dest):
        pass  # a writer that writes nothing must not replace the file either
    assert dest.read_bytes() == b"old"

    with atomic_write(dest) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_save_checkpoint_failure_leaves_previous_checkpoint(tmp_path, models, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny(), None, models[1].state_dict())
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny(), models[0].state_dict(), None)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
