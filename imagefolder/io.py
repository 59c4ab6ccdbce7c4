"""Crash-safe writing for every file and folder the package produces.

A reader must never see a half-written checkpoint, engine or report, and a failed write must never
destroy the previous version. ``atomic_write`` gives the writer a temporary path in the destination's
folder (same filesystem, so the final ``os.replace`` is atomic), flushes it to disk, then renames it
over the destination; on any exception the temporary file is removed and the destination is left as
it was. Importing this module imports no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagefolder.errors import OutputError, output_error


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


@contextmanager
def atomic_writes(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """``atomic_write`` for several files that belong together: all of them or none.

    The writer creates every temporary path; only when the block succeeds are they renamed into
    place, so a file that cannot be written leaves none of the others behind.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_write(path)) for path in paths]


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


# ---------------------------------------------------------------------------------------------------------------------
# Folders: a lock for writers, and staged replacement


@contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the writers' lock of folder ``path`` (which need not exist yet) for the block.

    The lock is an exclusive ``flock`` on the hidden file ``.<name>.lock`` beside the folder, which
    the holder deletes when it is done (a writer that was killed leaves it; the next one reuses it);
    the operating system releases the lock when the holder exits, however it exits. A second writer
    is refused at once with an ``OutputError`` that names the holder, rather than waiting or mixing
    its files in.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(path, err, "folder") from err
    fd = _take_lock(lock, path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # still held: a writer that opened it meanwhile sees it gone and takes a fresh one
        os.close(fd)  # releases the lock


def _take_lock(lock: Path, path: Path) -> int:
    """Open and ``flock`` the lock file; retried when its holder deleted it between our open and our lock."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise output_error(path, err, "folder") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"{path} is being written by another process (pid {holder}); wait for it to finish or choose "
                "another folder"
            ) from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # we locked a file its holder had already deleted: take the new one


@contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it replaces ``path`` in one step.

    Readers see the old folder or the new one, never a mixture or nothing: the staging folder sits
    beside ``path`` (same file system) and is exchanged with it atomically (Linux ``renameat2``
    with ``RENAME_EXCHANGE``; elsewhere two renames, the old folder kept until the new one is in
    place). The old contents are then deleted. On any exception, Ctrl-C included, the staging
    folder is deleted and ``path`` is left as it was. Call it under ``folder_lock``: leftovers of a
    writer that was killed (``.<name>.staging-*``) are removed first.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = path.with_name(f".{path.name}.staging-{uuid.uuid4().hex[:12]}")
    try:
        stage.mkdir(parents=True)
        yield stage
        _fsync_tree(stage)
        if path.exists():
            _exchange(stage, path)  # stage now holds the old folder
            shutil.rmtree(stage)
        else:
            os.rename(stage, path)
        if os.name == "posix":
            _fsync_path(path.parent)
    except OSError as err:
        shutil.rmtree(stage, ignore_errors=True)
        if _concerns(err, path, stage):
            raise output_error(path, err, "folder") from err
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            _fsync_path(file)
    _fsync_path(folder)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically where the kernel can, else by two renames with the old one kept until the end."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # not "unsupported here": a real failure
            raise OSError(code, os.strerror(code), os.fspath(b))
    backup = b.with_name(f".{b.name}.staging-old-{uuid.uuid4().hex[:12]}")
    os.rename(b, backup)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(backup, b)
        raise
    os.rename(backup, a)
