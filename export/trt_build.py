"""ONNX bundle → TensorRT engines, built on the target GPU.

``plan_profiles`` turns the bundle's graph specs into fixed-shape optimization profiles (min = opt =
max, so every step of the loop can be captured as a CUDA graph and replayed). ``build_engines``
parses each ONNX graph, builds one strongly typed engine per graph with those profiles, and writes
``BUNDLE/engines/<graph>.plan`` plus ``BUNDLE/engines/build.json`` (TensorRT version, GPU, profiles,
flags, sha256 of every plan) atomically. The runtime (``runtime/backends/trt/``) refuses plans
whose build record does not match the running TensorRT and GPU.

Supports TensorRT 10.x (JetPack 6 ships 10.3) and 11.x. Every ``trt.*`` name used here exists in
both 10.3 and 11.4, except those listed in ``VERSIONED_NAMES`` and reached only through
``_versioned``; ``tests/test_trt_api_names.py`` checks both rules against the real API listings.
This module imports neither torch nor (at import time) tensorrt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefolder.core import cuda, pruning
from imagefolder.core.bundle import load_bundle
from imagefolder.core.engines import (
    BUILD_FORMAT,
    BUILD_RECORD,
    BUILD_SCHEMA_VERSION,
    ENGINE_DIR,
    TIMING_CACHE,
    import_tensorrt,
    read_build_record,
    trt_major,
)
from imagefolder.core.specs import bindings, graph_specs, resolve_shape
from imagefolder.errors import EngineError, InputError
from imagefolder.io import atomic_write_bytes, atomic_write_text, folder_lock

log = logging.getLogger(__name__)


# Graphs placed on the DLA when a DLA core is requested. The generator (attention, TopK) is no DLA
# candidate; the convolutional tokenizer graphs may partly be (unsupported layers fall back to the GPU).
DLA_GRAPHS = ("encoder", "decoder")
# Graphs built without TF32 whatever ``tf32`` says. The sampler's cumulative sums are matrix products with
# triangular matrices (core/sampler.py): read with TF32's 10-bit mantissa, the cumulative mass moves by about
# 1e-3 and a uniform near a boundary picks another token (found on the fakes' TF32 model: sampled tokens at
# the official width, tests/test_trt_numerics.py). The graph is small; TF32 would gain nothing there.
EXACT_FP32_GRAPHS = ("sampler",)
HARDWARE_COMPAT = ("none", "ampere_plus", "same_cc")

# TensorRT names that exist only in some supported major versions: "Class.MEMBER" → majors that have it.
# Code reaches them only through ``_versioned(trt, name)``, which raises a clear error elsewhere.
VERSIONED_NAMES: dict[str, tuple[int, ...]] = {
    "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY": (11,),
}


class EngineBuildError(EngineError):
    """Parsing or building one graph failed."""


def _versioned(trt, name: str):
    """A TensorRT attribute that exists only in the major versions listed in ``VERSIONED_NAMES``."""
    majors = VERSIONED_NAMES[name]
    if trt_major(trt) not in majors:
        raise EngineBuildError(
            f"trt.{name} needs TensorRT {' or '.join(f'{m}.x' for m in majors)}; this is {trt.__version__}"
        )
    obj = trt
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# Manifest and profiles


@dataclass(frozen=True)
class ProfileSpec:
    """One fixed-shape optimization profile: every input of ``graph`` at one batch (and scale)."""

    graph: str
    batch: int
    scale_index: int | None  # None for the per-batch graphs
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "scale_index": self.scale_index,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
        }


def plan_profiles(manifest: dict, batches: list[int]) -> dict[str, list[ProfileSpec]]:
    """The optimization profiles of every graph in the bundle, in profile-index order.

    Args:
        manifest: the bundle's ``manifest.json`` as a dict.
        batches: image batch sizes to support (each at most ``manifest["batch_max"]``).

    Returns:
        graph name → profiles; encoder, decoder and ar_prefill get one per batch, ar_step one per
        (batch, scale 1..SN-1), sampler and fold one per (batch, scale 0..SN-1). Batch-major order.
    """
    if not batches:
        raise InputError("no batch sizes given")
    batch_max = manifest.get("batch_max")
    for b in batches:
        if b < 1 or (batch_max is not None and b > batch_max):
            raise InputError(f"batch {b} is outside 1..{batch_max} (the bundle's batch_max)")
    scales = list(manifest["model"]["generator"]["scales"])
    specs = graph_specs(manifest["model"], pruning.from_manifest(manifest))
    plan: dict[str, list[ProfileSpec]] = {}
    for graph in specs:  # GRAPH_NAMES, then a pruned bundle's scale step graphs (one profile per batch each)
        if graph not in manifest["graphs"]:
            continue
        inputs = manifest["graphs"][graph]["inputs"]
        profiles = []
        for batch in sorted(set(batches)):
            for si in specs[graph].served_scales(len(scales)):
                symbols = bindings(scales, batch, 0 if si is None else si)
                shapes = {t["name"]: resolve_shape(t["shape"], symbols) for t in inputs}
                profiles.append(ProfileSpec(graph, batch, si, shapes))
        plan[graph] = profiles
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Builder


def _logger(trt, verbose: bool):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def _progress_monitor(trt: Any, bar: Any) -> Any:
    """An ``IProgressMonitor`` that shows TensorRT's build phases on a tqdm bar, or None if unavailable."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._phases: dict[str, tuple[int, int]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._phases[phase_name] = (0, num_steps)
            if parent_phase is None and bar is not None:
                bar.set_postfix_str(phase_name, refresh=True)

        def step_complete(self, phase_name, step):
            done, total = self._phases.get(phase_name, (0, 0))
            self._phases[phase_name] = (step + 1, total)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self._phases.pop(phase_name, None)

    return BuildProgress()


def _parse_onnx(trt, trt_builder, onnx_path: Path, logger):
    """Parse one ONNX file into a strongly typed network; raise with every failing node on error."""
    # TensorRT 10 builds weakly typed networks unless asked; TensorRT 11 builds strongly typed ones
    # only, and its STRONGLY_TYPED flag is deprecated and ignored.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if trt_major(trt) < 11 else 0
    trt_network = trt_builder.create_network(flags)
    trt_parser = trt.OnnxParser(trt_network, logger)
    # parse_from_file resolves external weight files relative to the model (graphs over 2 GB).
    if not trt_parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(trt_parser.num_errors):
            trt_error = trt_parser.get_error(i)
            errors.append(
                f"  node {trt_error.node()} ({trt_error.node_name() or '?'}, op {trt_error.node_operator() or '?'}): "
                f"{trt_error.code()}: {trt_error.desc()}"
            )
        detail = "\n".join(errors) or "  (the parser reported no error detail)"
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n{detail}")
    for i in range(trt_network.num_inputs):
        trt_tensor = trt_network.get_input(i)
        if trt_tensor.is_shape_tensor:
            raise EngineBuildError(
                f"{onnx_path.name}: input {trt_tensor.name!r} is a shape tensor (its values set shapes); "
                "the graph contract allows execution tensors only — re-export the bundle"
            )
    return trt_network, trt_parser


def _configure(
    trt,
    trt_builder,
    graph: str,
    workspace_mib: int | None,
    opt_level: int,
    trt_cache,
    cache_bytes: bytes,
    dla_core: int | None,
    hardware_compat: str,
    version_compat: bool,
    detailed: bool,
    tf32: bool,
):
    trt_config = trt_builder.create_builder_config()
    if workspace_mib is not None:
        trt_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    trt_config.builder_optimization_level = int(opt_level)
    if trt_cache is None:
        # One timing cache for all graphs of a run, seeded from the file (empty bytes: a new cache).
        trt_cache = trt_config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache from another device or TensorRT version is rejected, not used.
    if trt_cache is None or not trt_config.set_timing_cache(trt_cache, False):
        log.warning("the timing cache does not fit this device or TensorRT version; starting a new one")
        trt_cache = trt_config.create_timing_cache(b"")
        trt_config.set_timing_cache(trt_cache, False)
    trt_config.profiling_verbosity = (
        trt.ProfilingVerbosity.DETAILED if detailed else trt.ProfilingVerbosity.LAYER_NAMES_ONLY
    )
    if dla_core is not None and graph in DLA_GRAPHS:
        trt_config.default_device_type = trt.DeviceType.DLA
        trt_config.DLA_core = int(dla_core)
        # Layers the DLA cannot run stay on the GPU; the engine inspector shows the placement.
        trt_config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if hardware_compat == "ampere_plus":
        trt_config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif hardware_compat == "same_cc":
        trt_config.hardware_compatibility_level = _versioned(trt, "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY")
    if version_compat:
        trt_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if not tf32 or graph in EXACT_FP32_GRAPHS:
        # TensorRT runs fp32 matmuls/convs in TF32 by default; off gives fp32 parity with ONNX Runtime.
        trt_config.clear_flag(trt.BuilderFlag.TF32)
    return trt_config, trt_cache


def _add_profiles(trt_builder, trt_config, trt_network, profiles: list[ProfileSpec]) -> None:
    network_inputs = {trt_network.get_input(i).name for i in range(trt_network.num_inputs)}
    for position, spec in enumerate(profiles):
        missing = set(spec.shapes) ^ network_inputs
        if missing:
            raise EngineBuildError(
                f"{spec.graph}: the ONNX inputs {sorted(network_inputs)} differ from the manifest's "
                f"{sorted(spec.shapes)} (mismatch: {sorted(missing)})"
            )
        trt_profile = trt_builder.create_optimization_profile()
        for name, shape in spec.shapes.items():
            trt_profile.set_shape(name, shape, shape, shape)
        # -1 is an invalid profile; any other index would make the build record (profile = position) lie.
        index = trt_config.add_optimization_profile(trt_profile)
        if index != position:
            where = f"batch {spec.batch}" + ("" if spec.scale_index is None else f", scale {spec.scale_index}")
            raise EngineBuildError(
                f"{spec.graph}: TensorRT refused optimization profile {position} ({where}): "
                f"add_optimization_profile returned {index}; see the TensorRT log above"
            )


def gpu_info() -> dict:
    """Name and compute capability of the current CUDA device (through cuda-python)."""
    props = cuda.device_properties()
    return {"name": props["name"], "compute_capability": props["compute_capability"]}


def default_batches(manifest: dict) -> list[int]:
    return sorted({1, int(manifest.get("batch_max") or 1)})


def build_engines(
    bundle_dir: str | os.PathLike,
    batches: list[int] | None = None,
    workspace_mib: int | None = None,
    opt_level: int = 3,
    timing_cache: str | os.PathLike | None = None,
    dla_core: int | None = None,
    hardware_compat: str | bool = "none",
    version_compat: bool = False,
    verbose: bool = False,
    progress: bool = True,
    graphs: list[str] | None = None,
    detailed: bool = True,
    tf32: bool = True,
) -> Path:
    """Build one TensorRT engine per graph of a bundle, on this machine's GPU.

    Args:
        bundle_dir: the folder ``imagefolder-export onnx`` wrote.
        batches: image batch sizes to build profiles for; default ``{1, batch_max}``.
        workspace_mib: cap of the builder's workspace pool (default: TensorRT's, the device memory).
        opt_level: ``builder_optimization_level`` 0..5 (TensorRT's default is 3).
        timing_cache: timing cache file, loaded if present and saved after every graph;
            default ``BUNDLE/engines/timing.cache``.
        dla_core: build the tokenizer graphs (encoder, decoder) for this DLA core with GPU fallback.
        hardware_compat: ``none``, ``ampere_plus``, or ``same_cc`` (TensorRT 11 only); True means ``ampere_plus``.
        version_compat: set ``BuilderFlag.VERSION_COMPATIBLE`` (plans then load on later TensorRT versions).
        verbose: TensorRT's verbose log.
        progress: a tqdm bar over the graphs, with TensorRT's build phases when it reports them.
        graphs: build only these graphs (default: all graphs in the bundle). Their records replace
            the old ones in ``build.json``; records of other graphs are kept only if built by this
            same TensorRT on this same GPU.
        detailed: ``ProfilingVerbosity.DETAILED`` (layer parameters and tactics in the engine inspector).
        tf32: allow TF32 for fp32 layers (TensorRT's default; never in ``EXACT_FP32_GRAPHS``); False for exact
            fp32 parity checks.

    Returns:
        the engines folder ``BUNDLE/engines`` (its ``build.json`` holds the build record).

    Raises:
        BundleError: the bundle is for another execution provider (integer compute).
        TensorRTUnavailable: tensorrt cannot be imported.
        EngineBuildError: a graph fails to parse or build (the message names the failing nodes).
    """
    load_bundle(bundle_dir, verify=False).require_tensorrt()  # the manifest alone says the bundle is for ORT
    trt = import_tensorrt()  # before hashing gigabytes: a machine without TensorRT hears so at once
    bundle = load_bundle(bundle_dir, verify=True)  # hashes every graph: engines are built from what was exported
    bundle_dir, manifest = bundle.path, bundle.manifest
    if isinstance(hardware_compat, bool):
        hardware_compat = "ampere_plus" if hardware_compat else "none"
    if hardware_compat not in HARDWARE_COMPAT:
        raise InputError(f"hardware_compat {hardware_compat!r} is not one of {HARDWARE_COMPAT}")
    if not 0 <= opt_level <= 5:
        raise InputError(f"opt_level {opt_level} is outside 0..5")
    batches = sorted(set(batches or default_batches(manifest)))
    plan = plan_profiles(manifest, batches)
    selected = list(plan) if graphs is None else list(graphs)
    for graph in selected:
        if graph not in plan:
            raise InputError(f"graph {graph!r} is not in the bundle (it has {', '.join(plan)})")

    with folder_lock(bundle_dir):  # no export may swap the bundle while its engines are written
        engine_dir = bundle_dir / ENGINE_DIR
        engine_dir.mkdir(parents=True, exist_ok=True)
        cache_path = Path(timing_cache) if timing_cache is not None else engine_dir / TIMING_CACHE
        logger = _logger(trt, verbose)
        trt_builder = trt.Builder(logger)
        if dla_core is not None and not 0 <= dla_core < trt_builder.num_DLA_cores:
            raise InputError(f"DLA core {dla_core} requested; this device has {trt_builder.num_DLA_cores} DLA cores")

        gpu = gpu_info()
        record_path = engine_dir / BUILD_RECORD
        record = {
            "format": BUILD_FORMAT,
            "schema_version": BUILD_SCHEMA_VERSION,
            "tensorrt_version": trt.__version__,
            "gpu": gpu,
            "bundle": {"name": manifest.get("name"), "dtype": manifest.get("dtype")},
            "batches": batches,
            "flags": {
                "strongly_typed": True,
                "workspace_mib": workspace_mib,
                "builder_optimization_level": opt_level,
                "dla_core": dla_core,
                "dla_graphs": list(DLA_GRAPHS) if dla_core is not None else [],
                "hardware_compat": hardware_compat,
                "version_compat": version_compat,
                "profiling_verbosity": "detailed" if detailed else "layer_names_only",
                "tf32": tf32,
            },
            "graphs": {},
        }
        if graphs is not None and record_path.is_file():
            old = read_build_record(bundle_dir)
            built = (old.get("tensorrt_version"), old.get("gpu"), old.get("batches"))
            if built == (trt.__version__, gpu, batches):
                record["graphs"] = {g: r for g, r in old.get("graphs", {}).items() if g not in selected}

        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        trt_cache = None

        from tqdm.auto import tqdm

        bar = tqdm(selected, desc="TensorRT engines", unit="graph", disable=not progress)
        for graph in bar:
            bar.set_description(f"TensorRT {graph}")
            entry = manifest["graphs"][graph]
            onnx_path = bundle_dir / entry["file"]
            started = time.perf_counter()
            trt_network, trt_parser = _parse_onnx(trt, trt_builder, onnx_path, logger)
            trt_config, trt_cache = _configure(
                trt,
                trt_builder,
                graph,
                workspace_mib,
                opt_level,
                trt_cache,
                cache_bytes,
                dla_core,
                hardware_compat,
                version_compat,
                detailed,
                tf32,
            )
            monitor = _progress_monitor(trt, bar if progress else None)
            if monitor is not None:
                trt_config.progress_monitor = monitor
            _add_profiles(trt_builder, trt_config, trt_network, plan[graph])
            log.info("building %s (%d profiles)", graph, len(plan[graph]))
            serialized = trt_builder.build_serialized_network(trt_network, trt_config)
            if serialized is None:
                raise EngineBuildError(
                    f"TensorRT failed to build {graph} from {onnx_path.name} (see the TensorRT log above; "
                    "on Jetson, a smaller --workspace often helps)"
                )
            data = bytes(serialized)
            plan_path = engine_dir / f"{graph}.plan"
            atomic_write_bytes(plan_path, data)
            atomic_write_bytes(cache_path, bytes(trt_cache.serialize()))
            onnx_sha = (manifest.get("files") or {}).get(entry["file"], {}).get("sha256")
            record["graphs"][graph] = {
                "file": f"{ENGINE_DIR}/{graph}.plan",
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "onnx_file": entry["file"],
                "onnx_sha256": onnx_sha,
                "build_seconds": round(time.perf_counter() - started, 2),
                "profiles": [dict(index=i, **p.to_dict()) for i, p in enumerate(plan[graph])],
            }
            del trt_parser, trt_network, trt_config, serialized
            # The record is rewritten after every graph, so an interrupted build still describes its plans.
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        bar.close()
        return engine_dir
