"""Checkpoint I/O: the official ImageFolder pickles in, our single-file safetensors format in and out.

Official files (``shared/reference/imagefolder-official.md`` §5) are torch pickles:

* AR ``ar-ckpt-last.pth``: ``{'epoch', 'iter', 'args': dict, 'trainer': {'config', 'var_wo_ddp',
  'vae_local', 'var_opt'}}``, i.e. generator and tokenizer weights plus optimizer state;
* tokenizer ``best_ckpt.pt``: ``{'model', 'ema', 'optimizer', 'discriminator', 'optimizer_disc',
  'steps', 'args': argparse.Namespace}`` (``ema`` is preferred, as the official VAR training does);
* a bare ``state_dict`` of either model.

Unpickling runs arbitrary code, so official files are read with an allow-list. Everything torch's
``weights_only`` loader allows is allowed, plus ``argparse.Namespace`` and inert stand-ins registered
under the real names of the ruamel-yaml round-trip types the official ``args`` may hold (so ruamel
is never imported, nor needed). Any other global raises ``CheckpointError`` naming it.
``torch.load(weights_only=True)`` itself cannot be used: its unpickler only extends exact ``list``s
and only sets items on exact ``dict``s, while ruamel's ``CommentedSeq`` pickles as a list subclass
filled by APPENDS, so no stand-in registered through ``torch.serialization.safe_globals`` can pass it.
We therefore give ``torch.load`` a restricted ``pickle.Unpickler`` (the ``find_class`` allow-list
pattern of the Python ``pickle`` documentation) with the same allowed set. ``trust_checkpoint=True``
(CLI ``--trust-checkpoint``) lifts the allow-list, for files from a trusted source only.

The configuration is inferred from tensor shapes (scales from the file's own ``patch_nums`` when
present, else the official scales when they fit) and mapped to a preset when one matches. Loading
into models is strict; the derived buffers (``attn_bias_for_masking``, which xformers builds pad to
288×288, ``lvl_1L``, ``lvl1LC``, ``zero_k_bias``) are validated against the model built from the
configuration and replaced by its own; ``module.`` / ``_orig_mod.`` wrapper prefixes are stripped.

Our format is ONE ``.safetensors`` file (weights only, keys prefixed ``tokenizer.`` / ``generator.``,
metadata ``format``, ``format_version``, ``config`` JSON and free-form extras) plus a ``<stem>.json``
sidecar with the config, both written atomically (``imagefolder.io.atomic_write``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import re
import types
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from imagefolder.configs import OFFICIAL_SCALES, PRESETS, GeneratorConfig, ModelConfig, TokenizerConfig
from imagefolder.errors import CheckpointError
from imagefolder.io import atomic_write, atomic_write_text
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "imagefolder-checkpoint"
FORMAT_VERSION = "1"
TRUST_HINT = "pass trust_checkpoint=True (CLI: --trust-checkpoint) only if the file comes from a trusted source"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_PARTS = ("tokenizer", "generator")




# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------


class YamlSeq(list):
    """Inert stand-in for ruamel's ``CommentedSeq`` (comment/format attributes kept as plain data)."""


class YamlMap(dict):
    """Inert stand-in for ruamel's ``CommentedMap`` and its ordered-dict bases."""


class YamlFloat(float):
    """Inert stand-in for ruamel's ``ScalarFloat`` family."""


class YamlInt(int):
    """Inert stand-in for ruamel's ``ScalarInt`` family (hex, octal, binary ...)."""


class YamlBool(int):
    """Inert stand-in for ruamel's ``ScalarBoolean`` (an int subclass)."""


class YamlStr(str):
    """Inert stand-in for ruamel's ``ScalarString`` family (quoted, literal, folded ...)."""


class YamlNode:
    """Inert stand-in for ruamel's bookkeeping objects (comments, tokens, marks, anchors, format)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> YamlNode:
        return super().__new__(cls)


def _ruamel_names(module: str, names: str, stand_in: type) -> dict[str, type]:
    return {f"ruamel.yaml.{module}.{name}": stand_in for name in names.split()}


STAND_INS: dict[str, type] = {
    **_ruamel_names("comments", "CommentedSeq", YamlSeq),
    **_ruamel_names("comments", "CommentedMap CommentedOrderedMap", YamlMap),
    **_ruamel_names("compat", "ordereddict", YamlMap),
    **_ruamel_names("comments", "Comment Format LineCol Tag TaggedScalar", YamlNode),
    **_ruamel_names("tokens", "CommentToken", YamlNode),
    **_ruamel_names("error", "StreamMark FileMark StringMark CommentMark", YamlNode),
    **_ruamel_names("anchor", "Anchor", YamlNode),
    **_ruamel_names("scalarfloat", "ScalarFloat ExponentialFloat ExponentialCapsFloat", YamlFloat),
    **_ruamel_names("scalarint", "ScalarInt BinaryInt OctalInt HexInt HexCapsInt DecimalInt", YamlInt),
    **_ruamel_names("scalarbool", "ScalarBoolean", YamlBool),
    **_ruamel_names(
        "scalarstring",
        "ScalarString LiteralScalarString FoldedScalarString SingleQuotedScalarString "
        "DoubleQuotedScalarString PlainScalarString PreservedScalarString",
        YamlStr,
    ),
}
"""Real dotted name of a ruamel-yaml type -> the inert class unpickled in its place."""


@functools.cache
def _allowed_globals() -> dict[str, Any]:
    # torch's own weights-only allow-list (tensor rebuilders, dtypes, OrderedDict, set ...).
    from torch._weights_only_unpickler import _get_allowed_globals

    return {**_get_allowed_globals(), "argparse.Namespace": argparse.Namespace}


class _ForbiddenGlobal(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    trusted = False

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles name builtins the Python 2 way
            module = "builtins"
        full = f"{module}.{name}"
        found = STAND_INS.get(full, _allowed_globals().get(full))
        if found is not None:
            return found
        if self.trusted:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(full)


class _TrustedUnpickler(_RestrictedUnpickler):
    trusted = True


def _pickle_module(unpickler: type[pickle.Unpickler]) -> types.SimpleNamespace:
    """A stand-in for the ``pickle`` module, as ``torch.load(pickle_module=...)`` uses it."""
    return types.SimpleNamespace(
        __name__=f"{__name__}.{unpickler.__name__}",
        Unpickler=unpickler,
        load=lambda file, **kwargs: unpickler(file, **kwargs).load(),
    )


def safe_load(path: str | os.PathLike, trust_checkpoint: bool = False) -> Any:
    """Unpickle a torch checkpoint on CPU with the allow-list (or without it when trusted).

    Zip-format files are memory-mapped, so tensors that are never used (optimizer state) are never
    read. Raises ``CheckpointError`` for a missing, truncated or corrupted file, a TorchScript
    archive, or a global outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                torchscript = any(n.endswith("/constants.pkl") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path}: file is truncated or not a torch checkpoint ({exc})") from exc
        if torchscript:
            raise CheckpointError(f"{path}: this is a TorchScript archive, not a checkpoint")
    unpickler = _TrustedUnpickler if trust_checkpoint else _RestrictedUnpickler
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_pickle_module(unpickler), mmap=is_zip
        )
    except _ForbiddenGlobal as exc:
        raise CheckpointError(
            f"{path}: refusing to unpickle global {exc.name!r}, which is not on the allow-list of what official "
            f"checkpoints contain; {TRUST_HINT}"
        ) from None
    except Exception as exc:  # torch and pickle raise many types for damaged files
        raise CheckpointError(
            f"{path}: file is truncated or not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def plain(obj: Any) -> Any:
    """Recursively turn stand-ins, Namespaces, dicts, lists and tuples into plain Python values."""
    if isinstance(obj, argparse.Namespace):
        return {k: plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, (bool, YamlBool)):
        return bool(obj)
    for kind in (str, int, float):
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, Mapping):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Official layouts
# ---------------------------------------------------------------------------------------------


@dataclass
class OfficialCheckpoint:
    """What an official file holds: the inferred (or given) config and the raw weights.

    The states are as stored, with wrapper prefixes stripped; derived buffers are reconciled when
    they are loaded into models (``build_models``). ``meta`` holds ``layout`` ("ar", "tokenizer" or
    "state_dict") and the file's bookkeeping (epoch, iter, steps, args, trainer config) as plain data.
    """

    config: ModelConfig
    tokenizer_state: dict[str, torch.Tensor] | None
    generator_state: dict[str, torch.Tensor] | None
    meta: dict[str, Any]


def _state_dict(obj: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: {what} is not a state dict (found {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {what} entry {key!r} is a {type(value).__name__}, not a tensor")
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _split_layout(obj: Any, path: Path) -> tuple[dict | None, dict | None, dict[str, Any]]:
    """-> (tokenizer state, generator state, meta) of any official layout."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    trainer = obj.get("trainer")
    if isinstance(trainer, Mapping) and "var_wo_ddp" in trainer:
        meta = {
            "layout": "ar",
            "epoch": plain(obj.get("epoch")),
            "iter": plain(obj.get("iter")),
            "args": plain(obj.get("args")),
            "trainer_config": plain(trainer.get("config")),
        }
        vae = trainer.get("vae_local")
        tok = None if vae is None else _state_dict(vae, "trainer['vae_local']", path)
        return tok, _state_dict(trainer["var_wo_ddp"], "trainer['var_wo_ddp']", path), meta
    if obj.get("ema") is not None or obj.get("model") is not None:
        which = "ema" if obj.get("ema") is not None else "model"
        meta = {
            "layout": "tokenizer",
            "weights": which,
            "steps": plain(obj.get("steps")),
            "args": plain(obj.get("args")),
        }
        return _state_dict(obj[which], f"[{which!r}]", path), None, meta
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = _state_dict(obj, "the state dict", path)
        is_gen = "pos_start" in state
        is_tok = any(k.startswith(("encoder.", "quantizes.")) for k in state)
        if is_gen != is_tok:
            meta = {"layout": "state_dict"}
            return (None, state, meta) if is_gen else (state, None, meta)
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(f"{path}: not an official ImageFolder checkpoint layout (top-level keys: {keys})")


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct integer indices right after ``prefix`` (``blocks.0.``, ``blocks.1.`` ...)."""
    heads = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return sum(h.isdigit() for h in heads)


def _shape(state: Mapping[str, torch.Tensor], key: str, part: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"cannot infer the {part} configuration: key {key!r} is missing; pass a config")
    return tuple(state[key].shape)


def _resolve_scales(
    hint: tuple[int, ...] | None, fits: Callable[[tuple[int, ...]], bool], what: str
) -> tuple[int, ...]:
    """The file's own scales (``patch_nums``) when it names them, else the official ones, if they fit."""
    if hint is not None:
        if not fits(hint):
            raise CheckpointError(f"the file's patch_nums {hint} do not fit its {what}")
        return hint
    if fits(OFFICIAL_SCALES):
        return OFFICIAL_SCALES
    raise CheckpointError(f"cannot infer the scales from the {what}: not the official ones; pass a config")


def _infer_tokenizer(state: Mapping[str, torch.Tensor], hint: tuple[int, ...] | None) -> TokenizerConfig:
    part = "tokenizer"
    _, tokens, width = _shape(state, "encoder.model.pos_embed", part)
    patch = _shape(state, "encoder.model.patch_embed.proj.weight", part)[-1]
    grid = math.isqrt(tokens - 1)
    if grid * grid + 1 != tokens:
        raise CheckpointError(f"encoder.model.pos_embed has {tokens} tokens, not 1 + a square grid")
    vocab, code_dim = _shape(state, "quantizes.0.embedding.weight", part)
    branches = _count(state, "quantizes.")
    num_scales = _shape(state, "quantizes.0.ema_vocab_hit_SV", part)[0]
    latents = _shape(state, "encoder.latent_tokens", part)[1] // branches
    scales = _resolve_scales(
        hint, lambda s: len(s) == num_scales and s[-1] ** 2 == latents, f"{num_scales} scales and {latents} latents"
    )
    return TokenizerConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        depth=_count(state, "encoder.model.blocks."),
        heads=max(1, width // 64),  # DINOv2 head dim; the checkpoint holds no per-head tensor
        mlp_ratio=_shape(state, "encoder.model.blocks.0.mlp.fc1.weight", part)[0] / width,
        codebook_size=vocab,
        code_dim=code_dim,
        num_branches=branches,
        scales=scales,
        num_phi=_count(state, "quantizes.0.quant_resi.qresi_ls."),
        with_teacher=any(k.startswith("semantic_model.") for k in state),
    )


def _infer_generator(state: Mapping[str, torch.Tensor], hint: tuple[int, ...] | None, branches: int) -> GeneratorConfig:
    part = "generator"
    width = _shape(state, "pos_start", part)[-1]
    depth = _count(state, "blocks.")
    positions = _shape(state, "pos_1LC", part)[1]
    scales = _resolve_scales(hint, lambda s: sum(pn * pn for pn in s) == positions, f"{positions} positions")
    return GeneratorConfig(
        depth=depth,
        width=width,
        heads=_shape(state, "blocks.0.attn.scale_mul_1H11", part)[1],
        mlp_ratio=_shape(state, "blocks.0.ffn.fc1.weight", part)[0] / width,
        num_classes=_shape(state, "class_emb.weight", part)[0] - 1,
        codebook_size=_shape(state, "head.weight", part)[0] // branches,
        code_dim=_shape(state, "word_embed.weight", part)[1] // branches,
        num_branches=branches,
        scales=scales,
        drop_path=0.1 * depth / 24,  # official rule; training only
    )


_TOKENIZER_SHAPE_FIELDS = (
    "image_size",
    "patch_size",
    "width",
    "depth",
    "mlp_ratio",
    "codebook_size",
    "code_dim",
    "num_branches",
    "scales",
    "num_phi",
    "with_teacher",
)
_GENERATOR_SHAPE_FIELDS = (
    "depth",
    "width",
    "heads",
    "mlp_ratio",
    "num_classes",
    "codebook_size",
    "code_dim",
    "num_branches",
    "scales",
)


def _same_shapes(a: Any, b: Any, fields: tuple[str, ...]) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _pair(tok: TokenizerConfig | None, gen: GeneratorConfig | None) -> ModelConfig:
    """A ModelConfig for the inferred part(s): the first matching preset, else a custom one."""
    for preset in PRESETS.values():
        if (tok is None or _same_shapes(tok, preset.tokenizer, _TOKENIZER_SHAPE_FIELDS)) and (
            gen is None or _same_shapes(gen, preset.generator, _GENERATOR_SHAPE_FIELDS)
        ):
            return preset
    # A part absent from the file gets the official architecture with the present part's vocabulary.
    vocab = ("codebook_size", "code_dim", "num_branches", "scales")
    if tok is None:
        tok = TokenizerConfig(**{k: getattr(gen, k) for k in vocab})
    if gen is None:
        gen = dataclasses.replace(GeneratorConfig(), **{k: getattr(tok, k) for k in vocab})
    name = f"custom-d{gen.depth}-{gen.codebook_size}"
    try:
        return ModelConfig(name=name, tokenizer=tok, generator=gen)
    except ValueError as exc:
        raise CheckpointError(f"the tokenizer and generator weights do not belong together: {exc}") from exc


def _scales_hint(meta: dict[str, Any]) -> tuple[int, ...] | None:
    sources = (meta.get("trainer_config"), meta.get("args"))
    for source in sources:
        if isinstance(source, dict):
            for key in ("patch_nums", "v_patch_nums"):
                value = source.get(key)
                if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                    return tuple(value)
    return None


def infer_config(
    tokenizer_state: Mapping[str, torch.Tensor] | None,
    generator_state: Mapping[str, torch.Tensor] | None,
    scales: tuple[int, ...] | None = None,
) -> ModelConfig:
    """The configuration that official-layout weights (either part or both) were built with.

    Sizes come from tensor shapes; ``scales`` (the file's ``patch_nums``) defaults to the official scales
    when they fit. The result is the first preset with the same shapes, else a ``custom-...`` config
    (the tokenizer's head count, which no tensor records, is then ``width // 64`` as in DINOv2).
    """
    if tokenizer_state is None and generator_state is None:
        raise ValueError("no weights to infer a config from")
    tok = None if tokenizer_state is None else _infer_tokenizer(tokenizer_state, scales)
    branches = 2 if tok is None else tok.num_branches
    gen = None if generator_state is None else _infer_generator(generator_state, scales, branches)
    return _pair(tok, gen)


def load_official(
    path: str | os.PathLike, trust_checkpoint: bool = False, config: ModelConfig | None = None
) -> OfficialCheckpoint:
    """Read an official AR, tokenizer or bare state-dict file and infer its configuration.

    ``config`` overrides the inference (needed for non-official scales without ``patch_nums``).
    """
    path = Path(path)
    tok, gen, meta = _split_layout(safe_load(path, trust_checkpoint), path)
    if config is None:
        try:
            config = infer_config(tok, gen, _scales_hint(meta))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        log.info("%s: %s layout, inferred config %r", path, meta["layout"], config.name)
    return OfficialCheckpoint(config=config, tokenizer_state=tok, generator_state=gen, meta=meta)


# ---------------------------------------------------------------------------------------------
# Strict loading into models
# ---------------------------------------------------------------------------------------------

_DERIVED = re.compile(r"(^|\.)(lvl_1L|lvl1LC|attn_bias_for_masking|zero_k_bias)$")


def _derived_matches(key: str, found: torch.Tensor, want: torch.Tensor) -> bool:
    # xformers builds pad the mask (286 -> 288); only the top-left P×P block is meaningful.
    padded = found.dim() == want.dim() and all(f >= w for f, w in zip(found.shape, want.shape, strict=True))
    if key.endswith("attn_bias_for_masking") and padded:
        found = found[tuple(slice(0, w) for w in want.shape)]
    return found.shape == want.shape and torch.equal(found.to(want.dtype), want)


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], part: str, source: str) -> None:
    expected = model.state_dict()
    state = dict(state)
    for key, want in expected.items():
        if _DERIVED.search(key):
            found = state.get(key)
            if found is not None and not _derived_matches(key, found, want):
                raise CheckpointError(
                    f"{source}: {part} buffer {key!r} {tuple(found.shape)} does not match the one derived from "
                    f"the config {tuple(want.shape)} (wrong scales or config?)"
                )
            state[key] = want
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for problem, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{source}: {part} weights do not match the model: {problem} {keys[0]!r}{more}")
    for key, want in expected.items():
        if state[key].shape != want.shape:
            raise CheckpointError(
                f"{source}: {part} weights do not match the model: {key!r} expected shape {tuple(want.shape)}, "
                f"found {tuple(state[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def build_models(
    config: ModelConfig,
    tokenizer_state: Mapping[str, torch.Tensor] | None,
    generator_state: Mapping[str, torch.Tensor] | None,
    device: str | torch.device = "cpu",
    source: str = "checkpoint",
) -> tuple[Tokenizer | None, Generator | None]:
    """Build the models whose weights are given, load them strictly, move to ``device``, eval mode."""
    tokenizer = generator = None
    if tokenizer_state is not None:
        tokenizer = Tokenizer(config.tokenizer)
        _load_strict(tokenizer, tokenizer_state, "tokenizer", source)
        tokenizer = tokenizer.to(device).eval()
    if generator_state is not None:
        generator = Generator(config.generator)
        _load_strict(generator, generator_state, "generator", source)
        generator = generator.to(device).eval()
    return tokenizer, generator


def load_models(
    path: str | os.PathLike,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
) -> tuple[ModelConfig, Tokenizer | None, Generator | None]:
    """Official file -> (config, tokenizer or None, generator or None), loaded strictly, eval mode."""
    ckpt = load_official(path, trust_checkpoint, config)
    tokenizer, generator = build_models(ckpt.config, ckpt.tokenizer_state, ckpt.generator_state, device, str(path))
    return ckpt.config, tokenizer, generator


# ---------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar next to a checkpoint: ``<stem>.json``."""
    return Path(path).with_suffix(".json")


def save_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    tokenizer_state: Mapping[str, torch.Tensor] | None,
    generator_state: Mapping[str, torch.Tensor] | None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights + config as one ``.safetensors`` file and a ``<stem>.json`` sidecar, atomically.

    ``extra_meta`` values that are not strings are stored as JSON. Returns the checkpoint path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: our checkpoints are .safetensors files")
    if tokenizer_state is None and generator_state is None:
        raise ValueError("nothing to save: both tokenizer_state and generator_state are None")
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_meta or {}).items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config.to_dict())}
    clash = sorted(set(extra) & set(metadata))
    if clash:
        raise ValueError(f"extra_meta may not set the reserved keys {clash}")
    tensors = {}
    for part, state in zip(_PARTS, (tokenizer_state, generator_state), strict=True):
        for key, value in (state or {}).items():
            # Own, contiguous CPU copies: safetensors rejects shared or strided storage.
            tensors[f"{part}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={**metadata, **extra})
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": path.name,
        "parts": [p for p, s in zip(_PARTS, (tokenizer_state, generator_state), strict=True) if s is not None],
        "config": config.to_dict(),
        "meta": extra,
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    log.info("wrote %s (%d tensors) and %s", path, len(tensors), sidecar_path(path).name)
    return path


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """Read our ``.safetensors`` checkpoint -> (config, tokenizer state or None, generator state or None)."""
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


def load_any(
    path: str | os.PathLike,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
) -> tuple[ModelConfig, Tokenizer | None, Generator | None]:
    """Built models from our ``.safetensors`` checkpoint or from an official torch file (any other suffix).

    ``trust_checkpoint`` and ``config`` apply to official files only.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        cfg, tok_state, gen_state = load_checkpoint(path)
        tokenizer, generator = build_models(cfg, tok_state, gen_state, device, str(path))
        return cfg, tokenizer, generator
    return load_models(path, trust_checkpoint, device, config)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    trust_checkpoint: bool = False,
    config: ModelConfig | None = None,
) -> Path:
    """Official file -> our ``.safetensors`` + JSON; the weights are validated by a strict load first."""
    src = Path(src)
    ckpt = load_official(src, trust_checkpoint, config)
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


# ---------------------------------------------------------------------------------------------
# Writing files in the official layouts (tests and demos)
# ---------------------------------------------------------------------------------------------


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _adam_state(module: nn.Module, steps: int, lr: float) -> dict[str, Any]:
    """A ``torch.optim.AdamW.state_dict()``-shaped dict (zero moments) for the module's parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    state = {
        i: {"step": torch.tensor(float(steps)), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for i, p in enumerate(params)
    }
    group = {
        "lr": lr,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.05,
        "amsgrad": False,
        "foreach": None,
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "params": list(range(len(params))),
    }
    return {"state": state, "param_groups": [group]}


def official_ar_payload(
    config: ModelConfig, generator: Generator, tokenizer: Tokenizer, epoch: int = 350, iteration: int = 0
) -> dict[str, Any]:
    """The dict an official ``ar-ckpt-last.pth`` holds, for these models (zero Adam moments)."""
    gen, tok = config.generator, config.tokenizer
    scales = tuple(gen.scales)
    args = {
        "depth": gen.depth,
        "pn": "_".join(map(str, scales)),
        "patch_nums": scales,
        "num_classes": gen.num_classes,
        "vae_ckpt": "best_ckpt.pt",
        "codebook_size": tok.codebook_size,
        "codebook_embed_dim": tok.code_dim,
        "product_quant": tok.num_branches,
        "v_patch_nums": list(scales),
        "ep": epoch + 1,
        "tblr": 1e-4,
        "twd": 0.05,
        "ls": 0.0,
        "fp16": 2,
        "cfg": 1.5,
        "seed": 0,
    }
    return {
        "epoch": epoch,
        "iter": iteration,
        "args": args,
        "trainer": {
            "config": {
                "patch_nums": scales,
                "resos": tuple(16 * pn for pn in scales),
                "label_smooth": 0.0,
                "prog_it": 0,
                "last_prog_si": -1,
                "first_prog": True,
            },
            "var_wo_ddp": _cpu_state(generator),
            "vae_local": _cpu_state(tokenizer),
            "var_opt": {"optimizer": _adam_state(generator, steps=1000, lr=1e-4)},
        },
    }


def write_official_ar_checkpoint(
    path: str | os.PathLike, config: ModelConfig, generator: Generator, tokenizer: Tokenizer
) -> Path:
    """Write a file in the exact official ``ar-ckpt-last.pth`` layout (for tests and demos)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(official_ar_payload(config, generator, tokenizer), tmp)
    return path


def official_tokenizer_payload(
    tokenizer: Tokenizer, ema: Tokenizer | None = None, args: argparse.Namespace | None = None
) -> dict[str, Any]:
    """The dict an official tokenizer ``best_ckpt.pt`` holds (``ema`` only when given)."""
    cfg = tokenizer.cfg
    if args is None:
        args = argparse.Namespace(
            image_size=cfg.image_size,
            codebook_size=cfg.codebook_size,
            codebook_embed_dim=cfg.code_dim,
            product_quant=cfg.num_branches,
            v_patch_nums=list(cfg.scales),
            enc_type="dinov2",
            ema=ema is not None,
        )
    return {
        "model": _cpu_state(tokenizer),
        "ema": None if ema is None else _cpu_state(ema),
        "optimizer": _adam_state(tokenizer, steps=1000, lr=3e-5),
        "discriminator": {},
        "optimizer_disc": {},
        "steps": 1000,
        "args": args,
    }


def write_official_tokenizer_checkpoint(
    path: str | os.PathLike, tokenizer: Tokenizer, ema: Tokenizer | None = None, args: argparse.Namespace | None = None
) -> Path:
    """Write a file in the official tokenizer ``best_ckpt.pt`` layout (for tests and demos)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(official_tokenizer_payload(tokenizer, ema, args), tmp)
    return path
