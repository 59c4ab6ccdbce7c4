"""Allow-listed unpickling of torch checkpoints: nothing in a file runs code unless the user trusts it.

Unpickling runs arbitrary code, so official files (torch pickles) are read with an allow-list.
Everything torch's ``weights_only`` loader allows is allowed, plus ``argparse.Namespace`` and inert
stand-ins registered under the real names of the ruamel-yaml round-trip types the official ``args``
may hold (so ruamel is never imported, nor needed). Any other global raises ``CheckpointError``
naming it. ``torch.load(weights_only=True)`` itself cannot be used: its unpickler only extends exact
``list``s and only sets items on exact ``dict``s, while ruamel's ``CommentedSeq`` pickles as a list
subclass filled by APPENDS, so no stand-in registered through ``torch.serialization.safe_globals``
can pass it. We therefore give ``torch.load`` a restricted ``pickle.Unpickler`` (the ``find_class``
allow-list pattern of the Python ``pickle`` documentation) with the same allowed set.
``trust_checkpoint=True`` (CLI ``--trust-checkpoint``) lifts the allow-list, for trusted files only.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from imagefolder.errors import CheckpointError

TRUST_HINT = "pass trust_checkpoint=True (CLI: --trust-checkpoint) only if the file comes from a trusted source"


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
