"""What the commands share: opening a backend, the error types they turn into messages, logging."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import click

BACKENDS = ("auto", "ort", "trt", "torch")


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: shown as one line, exit code 1."""
    from imagefolder.runtime.bundle import BundleError

    errors: list[type[BaseException]] = [BundleError, ValueError, FileNotFoundError, KeyError]
    for module, name in (
        ("imagefolder.checkpoint", "CheckpointError"),
        ("imagefolder.export.onnx_export", "ExportError"),
        ("imagefolder.export.trt_build", "TensorRTUnavailable"),
        ("imagefolder.export.trt_build", "EngineBuildError"),
        ("imagefolder.runtime.backends.trt", "EngineMismatch"),
        ("imagefolder.runtime.backends.ort", "OrtBackendError"),
        ("imagefolder.runtime.cuda", "CudaUnavailable"),
        ("imagefolder.runtime.cuda", "CudaError"),
        ("imagefolder.default_model", "DefaultModelMissing"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def run_cli(fn, *args, **kwargs):
    """Call a library function and turn user errors into a clean message (exit code 1)."""
    try:
        return fn(*args, **kwargs)
    except user_errors() as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise click.ClickException(str(message)) from err


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise click.BadParameter(f"give at least one {what}")
    return values


ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}


def ort_providers(text: str | None) -> list[str] | None:
    """``cuda,cpu`` → ONNX Runtime provider names in order of preference (None: CPU only)."""
    if not text:
        return None
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ORT_PROVIDERS]
    if unknown:
        raise click.BadParameter(f"unknown provider(s) {unknown}; choose from {', '.join(ORT_PROVIDERS)}")
    return [ORT_PROVIDERS[n] for n in names]


def open_backend(bundle: Path | None, backend: str, checkpoint: Path | None = None, trust_checkpoint: bool = False,
                 use_cuda_graphs: bool = True, layer_profile: bool = False, providers: list[str] | None = None):
    """Resolve ``--backend auto`` and build the backend.

    auto: TensorRT when the bundle has engines and TensorRT imports, else ONNX Runtime for a
    bundle; with no bundle, the PyTorch reference on ``checkpoint`` (or the default model).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if bundle is None:
            backend = "torch"
        elif (bundle / "engines" / "build.json").exists() and importlib.util.find_spec("tensorrt"):
            backend = "trt"
        else:
            backend = "ort"
    if backend in ("ort", "trt") and bundle is None:
        raise ValueError(f"--backend {backend} needs --bundle DIR (made by `imagefolder-export onnx`)")
    if backend == "ort":
        from imagefolder.runtime.backends.ort import OrtBackend
        from imagefolder.runtime.bundle import load_bundle

        return OrtBackend(load_bundle(bundle), providers=providers)
    if backend == "trt":
        from imagefolder.runtime.backends.trt import TrtBackend
        from imagefolder.runtime.bundle import load_bundle

        return TrtBackend(load_bundle(bundle), use_cuda_graphs=use_cuda_graphs, layer_profile=layer_profile)
    return open_torch_backend(bundle, checkpoint, trust_checkpoint)


def open_torch_backend(bundle: Path | None, checkpoint: Path | None, trust_checkpoint: bool):
    if importlib.util.find_spec("torch") is None:
        raise ValueError("--backend torch needs PyTorch: pip install 'imagefolder[torch]'")
    from imagefolder.default_model import load_models
    from imagefolder.export.onnx_export import default_candidates
    from imagefolder.runtime.backends.torch_backend import TorchBackend

    candidates = None
    if bundle is not None:
        from imagefolder.runtime.bundle import load_bundle

        manifest = load_bundle(bundle).manifest
        candidates = manifest["sampler_candidates"]
        if checkpoint is None and manifest.get("source", {}).get("checkpoint") not in (None, "default"):
            checkpoint = Path(manifest["source"]["checkpoint"])
    config, tokenizer, generator, _ = load_models(checkpoint, trust_checkpoint)
    candidates = candidates or default_candidates(config.generator.codebook_size)
    return TorchBackend(tokenizer, generator, candidates)
