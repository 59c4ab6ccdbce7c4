"""The models and bundles a benchmark run measures, exported once into a work folder and reused.

Random weights (seed 0) for a preset, or the default model that ships with the package. A bundle is
reused when its manifest holds the same model configuration, dtype and weight format, and a batch
maximum of at least 8; anything else is exported again. Bundles are exported with ``batch_max = 8``,
the largest batch the suite measures.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagefolder.configs import ModelConfig, from_name
from imagefolder.core import pruning
from imagefolder.core.bundle import MANIFEST, Bundle, load_bundle
from imagefolder.errors import BundleError
from imagefolder.export.onnx_export import export_bundle
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer

BATCH_MAX = 8
DEFAULT_MODEL = "default"  # the model that ships with the package (the tiny preset, trained)


@dataclass
class Models:
    """fp32 PyTorch models and where their weights come from."""

    name: str  # a preset name, or DEFAULT_MODEL
    config: ModelConfig
    tokenizer: Tokenizer
    generator: Generator


def load_models(name: str, seed: int = 0) -> Models:
    """``DEFAULT_MODEL``'s trained weights, or a preset with random weights (the same for a seed)."""
    if name == DEFAULT_MODEL:
        from imagefolder.default_model import load_default_or_checkpoint

        config, tokenizer, generator, _ = load_default_or_checkpoint()
        return Models(name, config, tokenizer, generator)
    config = from_name(name)
    torch.manual_seed(seed)
    return Models(name, config, Tokenizer(config.tokenizer).eval(), Generator(config.generator).eval())


def weight_formats() -> tuple[str, ...]:
    """Weight formats ``export_bundle`` can write besides the dtype's own: ("int8", "int4") once it takes
    ``weights=`` (branch ``quantize``), none before."""
    return ("int8", "int4") if "weights" in inspect.signature(export_bundle).parameters else ()


def weight_format(manifest: dict) -> str:
    """A bundle's weight format: "fp" (the dtype's own), or what the ``quantize`` branch's manifests name
    in ``weights`` ("int8", "int4"); earlier manifests hold byte counts there instead."""
    stored = manifest.get("weights")
    return stored if isinstance(stored, str) else "fp"


def bundle_bytes(manifest: dict) -> int:
    """Every file of a bundle (its ONNX graphs and their weights), as the manifest lists them."""
    return sum(entry["bytes"] for entry in manifest["files"].values())


def _matches(folder: Path, models: Models, dtype: str, weights: str | None, extra: dict[str, Any]) -> bool:
    path = folder / MANIFEST
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    return (
        manifest.get("model") == json.loads(json.dumps(models.config.to_dict()))
        and manifest.get("dtype") == dtype
        and weight_format(manifest) == (weights or "fp")
        and manifest.get("compute", "float") == extra.get("compute", "float")
        and pruning.from_manifest(manifest) == extra.get("prune", {})
        and manifest.get("batch_max", 0) >= BATCH_MAX
        and manifest.get("source", {}).get("bench") == models.name
    )


def variant_label(options: dict[str, Any]) -> str:
    """A folder-name suffix for export options beyond dtype and weights: ``compute`` and ``prune``."""
    parts = [options["compute"]] if options.get("compute", "float") != "float" else []
    if options.get("prune"):
        parts.append("prune" + "_".join(f"{si}-{ratio:g}" for si, ratio in sorted(options["prune"].items())))
    return "".join(f"-{part}" for part in parts)


def bundle(
    workdir: Path,
    models: Models,
    dtype: str = "fp32",
    weights: str | None = None,
    say: Callable[[str], None] = print,
    **options: Any,
) -> Bundle:
    """The bundle of ``models`` in ``dtype`` (and quantized ``weights``), exported into ``workdir`` unless there.

    ``options``: further ``export_bundle`` arguments that change the graphs (``compute``, ``prune``).
    """
    label = f"{dtype}" + (f"-{weights}" if weights else "") + variant_label(options)
    folder = workdir / f"{models.name}-{label}"
    if _matches(folder, models, dtype, weights, options):
        try:
            found = load_bundle(folder, verify=False)
            say(f"reusing {folder}")
            return found
        except BundleError as err:  # written by another imagefolder (an older schema): export it anew
            say(f"not reusing {folder}: {err}")
    say(f"exporting {models.name} ({label}) into {folder}")
    start = time.perf_counter()
    extra: dict[str, Any] = ({"weights": weights} if weights else {}) | options
    export_bundle(
        folder,
        models.tokenizer,
        models.generator,
        models.config,
        dtype=dtype,
        batch_max=BATCH_MAX,
        source={"bench": models.name},
        **extra,
    )
    say(f"exported {models.name} ({label}) in {time.perf_counter() - start:.0f} s")
    return load_bundle(folder, verify=False)
