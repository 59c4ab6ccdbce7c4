"""Every error a user can cause, in one hierarchy.

A user error is anything the person running imagefolder can fix: a wrong or damaged file, a value
out of range, a package that is not installed, engines built elsewhere, an output path that cannot
be written. Each is an ``ImagefolderError`` whose message names the culprit (the file, the value,
the tensor) and says what to do. The command line catches this base class once and prints one line,
``Error: <message>``, with exit code 1; ``-vv`` adds the traceback. Anything else is a bug and keeps
its traceback.

Errors that are also a built-in kind keep that base too (``InputError`` is a ``ValueError``,
``MissingDependency`` an ``ImportError``), so library callers can catch either. No torch here.
"""

from __future__ import annotations

import os

from imagefolder.install import install_command


class ImagefolderError(Exception):
    """Base of every error a user can cause and fix."""


class InputError(ImagefolderError, ValueError):
    """A value given by the user is invalid: a class id, a sampling parameter, a batch size, an option."""


class BundleError(ImagefolderError):
    """A bundle cannot be used: missing, malformed, from an incompatible version, or modified."""


class CheckpointError(ImagefolderError):
    """A checkpoint cannot be loaded: unreadable, wrong layout, wrong or non-finite tensors, or untrusted."""


class ImageFileError(ImagefolderError):
    """An input image cannot be used: not an image, truncated, too large, or of an unsupported mode."""


class ExportError(ImagefolderError):
    """The export could not produce a valid graph, or a graph failed its parity check."""


class EngineError(ImagefolderError):
    """TensorRT engines cannot be built here, or the ones present cannot run here."""


class DeviceError(ImagefolderError):
    """The GPU or its driver refused a call (no device, driver too old for the CUDA runtime, out of memory)."""


class OutputError(ImagefolderError):
    """An output the user asked for cannot be written (the path, its folder, or the disk)."""


class MissingDependency(ImagefolderError, ImportError):
    """An optional package is not installed; the message gives the pip command that adds the extra bringing it
    to this installation (``imagefolder.install``: a checkout, a wheel, or an index).

    ``install`` replaces the pip command where no extra brings the package (JetPack's TensorRT comes
    from apt); ``extra`` still names the extra for the rest of the stack.
    """

    def __init__(
        self,
        package: str,
        extra: str,
        detail: str | BaseException | None = None,
        purpose: str = "",
        hint: str = "",
        install: str = "",
    ):
        self.package, self.extra = package, extra
        why = f" ({detail})" if detail else ""
        need = f" {purpose}" if purpose else ""
        more = f"; {hint}" if hint else ""
        command = install or install_command(extra)
        super().__init__(f"{package} is not installed{need}{why}: {command}{more}")


def output_error(path: str | os.PathLike, err: OSError, what: str = "output") -> OutputError:
    """An ``OutputError`` for an ``OSError`` raised while writing ``path``."""
    reason = err.strerror or str(err)
    culprit = os.fspath(err.filename) if err.filename is not None else None
    if isinstance(err, FileExistsError | NotADirectoryError) and culprit and culprit != os.fspath(path):
        reason = f"{culprit} is a file, not a folder"
    return OutputError(f"cannot write the {what} {os.fspath(path)}: {reason}")
