"""What the commands share: opening a backend, the error types they turn into messages, logging."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from imagefolder.errors import ImagefolderError, InputError, MissingDependency

if TYPE_CHECKING:
    from imagefolder.runtime.backends.base import Backend

BACKENDS = ("auto", "ort", "trt", "torch")


_verbosity = 0


def setup_logging(verbose: int) -> None:
    global _verbosity
    _verbosity = max(_verbosity, verbose)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


class CommandGroup(click.Group):
    """A click group that reports every user error once: ``Error: ...`` on one line, exit code 1.

    User errors are ``ImagefolderError`` (wrong files and values, missing packages, engines built
    elsewhere) and ``OSError`` on the paths a user names; ``-vv`` prints the traceback too. Ctrl-C
    (SIGINT), SIGTERM and SIGHUP anywhere end the command with ``Aborted`` and exit code 128 + the
    signal's number (130 for Ctrl-C), after the files being written were discarded (atomic writes and
    staging folders clean up on the way out), never with a crash of the interpreter.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        global _verbosity
        _verbosity = 0  # each command line sets its own (-v on the group or on a subcommand raises it)
        previous = _catch_interrupts()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (KeyboardInterrupt, click.exceptions.Abort):
            _abort()
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except (ImagefolderError, OSError) as err:
            if _interrupted:
                _abort()
            _report(err)
            sys.exit(1)
        except BaseException:
            if _interrupted:  # an interrupt inside a C extension can surface as another exception
                _abort()
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        sys.exit(code if isinstance(code, int) else 0)


# The signals that end a command: each unwinds it like Ctrl-C, so that what it was writing is discarded.
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_interrupted: int = 0  # the number of the signal that ended the command, 0 while none did


def _on_interrupt(signum, frame) -> None:
    global _interrupted
    _interrupted = signum
    raise KeyboardInterrupt


def _catch_interrupts() -> dict:
    """Install the handler of every ending signal (main thread only); returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _on_interrupt) for signum in ENDING_SIGNALS}


def _abort() -> None:
    """Leave at once with 128 + the signal (130 for Ctrl-C): an interrupted import of a C extension can crash
    the interpreter's shutdown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        os.write(2, b"Aborted\n")
    os._exit(128 + (_interrupted or signal.SIGINT))


def _report(err: BaseException) -> None:
    if _verbosity >= 2:
        traceback.print_exc()
    if isinstance(err, OSError) and not isinstance(err, ImagefolderError):
        where = f"{err.filename}: " if err.filename else ""
        message = f"{where}{err.strerror or err}"
    else:
        message = str(err)
    click.echo(f"Error: {message}", err=True)


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise click.BadParameter(f"give at least one {what}")
    return values


ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def ort_providers(text: str | None) -> list[str] | None:
    """``cuda,cpu`` → ONNX Runtime provider names in order of preference (None: CPU only)."""
    if not text:
        return None
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ORT_PROVIDERS]
    if unknown:
        raise click.BadParameter(f"unknown provider(s) {unknown}; choose from {', '.join(ORT_PROVIDERS)}")
    return [ORT_PROVIDERS[n] for n in names]


def open_backend(
    bundle: Path | None,
    backend: str,
    checkpoint: Path | None = None,
    trust_checkpoint: bool = False,
    use_cuda_graphs: bool = True,
    layer_profile: bool = False,
    providers: list[str] | None = None,
) -> Backend:
    """Resolve ``--backend auto`` and build the backend.

    auto: TensorRT when the bundle has engines and TensorRT imports, else ONNX Runtime for a
    bundle; with no bundle, the PyTorch reference on ``checkpoint`` (or the default model).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if bundle is None:
            backend = "torch"
        elif (bundle / "engines" / "build.json").exists() and importlib.util.find_spec("tensorrt"):
            backend = "trt"
        else:
            backend = "ort"
    if backend == "torch":
        return open_torch_backend(bundle, checkpoint, trust_checkpoint)
    if bundle is None:
        raise InputError(f"--backend {backend} needs --bundle DIR (made by `imagefolder-export onnx`)")
    from imagefolder.core.bundle import load_bundle

    if backend == "ort":
        from imagefolder.runtime.backends.ort import OrtBackend

        return OrtBackend(load_bundle(bundle), providers=providers)
    from imagefolder.runtime.backends.trt import TrtBackend

    return TrtBackend(load_bundle(bundle), use_cuda_graphs=use_cuda_graphs, layer_profile=layer_profile)


def open_torch_backend(bundle: Path | None, checkpoint: Path | None, trust_checkpoint: bool) -> Backend:
    if importlib.util.find_spec("torch") is None:
        raise MissingDependency("PyTorch", "torch", purpose="for --backend torch")
    from imagefolder.core.sampler import default_candidates
    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.runtime.backends.torch_backend import TorchBackend

    candidates, prune = None, None
    if bundle is not None:
        from imagefolder.core.bundle import load_bundle

        loaded = load_bundle(bundle)
        manifest, prune = loaded.manifest, loaded.prune  # the reference of a pruned bundle prunes alike
        candidates = manifest["sampler_candidates"]
        if checkpoint is None and manifest.get("source", {}).get("checkpoint") not in (None, "default"):
            checkpoint = Path(manifest["source"]["checkpoint"])
    config, tokenizer, generator, _ = load_default_or_checkpoint(checkpoint, trust_checkpoint)
    candidates = candidates or default_candidates(config.generator.codebook_size)
    return TorchBackend(tokenizer, generator, candidates, prune=prune)
