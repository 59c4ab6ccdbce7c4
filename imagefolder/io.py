"""Crash-safe file writing for every file the package produces.

A reader must never see a half-written checkpoint, engine or report, and a failed write must never
destroy the previous version. ``atomic_write`` gives the writer a temporary path in the destination's
folder (same filesystem, so the final ``os.replace`` is atomic), flushes it to disk, then renames it
over the destination; on any exception the temporary file is removed and the destination is left as
it was. Importing this module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagefolder.errors import output_error


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for the writer to create; on success it atomically becomes ``path``.

    The temporary file sits next to ``path`` (hidden, ``.tmp`` suffix) and does not exist yet when
    yielded: the writer creates it, so it gets the usual permissions. Missing parent folders are
    created. Usage::

        with atomic_write("model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer did not create {tmp}")
        _fsync_path(tmp)
        os.replace(tmp, path)
        if os.name == "posix":  # make the rename itself durable
            _fsync_path(path.parent)
    except OSError as err:
        _discard(tmp)
        if _concerns(err, path, tmp):
            raise output_error(path, err) from err
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _concerns(err: OSError, path: Path, tmp: Path) -> bool:
    """Is ``err`` about the destination (its folder, the temporary file, the rename), not another file?"""
    if err.filename is None:
        return err.errno is not None  # a failed write into the temporary file (a full disk, a quota)
    return os.fspath(err.filename) in {os.fspath(p) for p in (path, tmp, *path.parents)}


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bundles hold GB-sized graphs and engines)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
