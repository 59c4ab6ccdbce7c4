"""Shared helpers of the TensorRT and Triton tests: a bundle manifest made from a config, no export needed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from imagefolder.configs import ModelConfig
from imagefolder.core.specs import SCHEMA_VERSION, graph_specs, state_dtype


def make_manifest(cfg: ModelConfig, dtype: str = "fp32", batch_max: int = 8, candidates: int = 64) -> dict:
    sd = state_dtype(dtype)
    specs = graph_specs(cfg.to_dict())
    graphs = {
        name: {
            "file": f"{name}.onnx",
            "external_data": [],
            "inputs": [t.to_dict(sd) for t in spec.inputs],
            "outputs": [t.to_dict(sd) for t in spec.outputs],
        }
        for name, spec in specs.items()
    }
    return {
        "format": "imagefolder-bundle",
        "schema_version": SCHEMA_VERSION,
        "name": cfg.name,
        "model": cfg.to_dict(),
        "dtype": dtype,
        "state_dtype": sd,
        "opset": 17,
        "batch_max": batch_max,
        "sampler_candidates": candidates,
        "graphs": graphs,
        "files": {},
    }


def write_fake_bundle(root: Path, manifest: dict, plan_record: dict | None = None) -> Path:
    """A bundle folder with placeholder graph files (correct hashes) and, optionally, fake plans + build.json."""
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in manifest["graphs"].items():
        data = f"placeholder {name}".encode()
        (root / entry["file"]).write_bytes(data)
        manifest["files"][entry["file"]] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    if plan_record is not None:
        (root / "engines").mkdir(exist_ok=True)
        for entry in plan_record["graphs"].values():
            data = b"fake plan " + entry["file"].encode()
            (root / entry["file"]).write_bytes(data)
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        (root / "engines" / "build.json").write_text(json.dumps(plan_record))
    return root


def fake_build_record(manifest: dict, batches: list[int]) -> dict:
    """What ``build_engines`` would record, without TensorRT."""
    from imagefolder.core.engines import BUILD_FORMAT, BUILD_SCHEMA_VERSION
    from imagefolder.export.trt_build import plan_profiles

    plan = plan_profiles(manifest, batches)
    return {
        "format": BUILD_FORMAT,
        "schema_version": BUILD_SCHEMA_VERSION,
        "tensorrt_version": "10.3.0",
        "gpu": {"name": "Orin", "compute_capability": "8.7"},
        "batches": sorted(batches),
        "flags": {"hardware_compat": "none", "version_compat": False},
        "graphs": {
            graph: {
                "file": f"engines/{graph}.plan",
                "onnx_file": f"{graph}.onnx",
                "onnx_sha256": manifest["files"].get(f"{graph}.onnx", {}).get("sha256"),
                "profiles": [dict(index=i, **p.to_dict()) for i, p in enumerate(profiles)],
            }
            for graph, profiles in plan.items()
        },
    }
