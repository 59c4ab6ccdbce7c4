"""Bundle loading: a tiny bundle folder with real (I/O-only) ONNX files, and every way it can be refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from imagefolder.configs import tiny
from imagefolder.core.bundle import BundleError, load_bundle
from imagefolder.core.schedule import num_positions
from imagefolder.core.specs import GRAPH_NAMES, SCHEMA_VERSION, graph_specs

CANDIDATES = 16
ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
}


def _onnx_graph(spec, rename: dict[str, str] | None = None) -> bytes:
    """A model that declares the spec's inputs and outputs (the loader only reads the I/O)."""
    rename = rename or {}

    def info(t):
        return helper.make_tensor_value_info(rename.get(t.name, t.name), ONNX_TYPES[_dtype(t.dtype)], list(t.shape))

    graph = helper.make_graph([], spec.name, [info(t) for t in spec.inputs], [info(t) for t in spec.outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _dtype(dtype: str) -> str:
    return "float32" if dtype == "state" else dtype


def _record(folder: Path, rel: str) -> dict:
    data = (folder / rel).read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def make_bundle(folder: Path, graph_files: dict[str, bytes] | None = None) -> Path:
    """Write a tiny-config bundle; ``graph_files`` replaces the I/O-only graphs (e.g. with runnable ones)."""
    model = tiny().to_dict()
    specs = graph_specs(model)
    folder.mkdir(parents=True, exist_ok=True)
    graphs, files = {}, {}
    for name in GRAPH_NAMES:
        (folder / f"{name}.onnx").write_bytes((graph_files or {}).get(name) or _onnx_graph(specs[name]))
        files[f"{name}.onnx"] = _record(folder, f"{name}.onnx")
        graphs[name] = {
            "file": f"{name}.onnx",
            "external_data": [],
            "inputs": [t.to_dict("float32") for t in specs[name].inputs],
            "outputs": [t.to_dict("float32") for t in specs[name].outputs],
            "doc": specs[name].doc,
            "parity": {},
        }
    manifest = {
        "format": "imagefolder-bundle",
        "schema_version": SCHEMA_VERSION,
        "name": "tiny",
        "model": model,
        "dtype": "fp32",
        "state_dtype": "float32",
        "opset": 17,
        "batch_max": 4,
        "sampler_candidates": CANDIDATES,
        "graphs": graphs,
        "files": files,
        "producer": {},
        "source": {},
        "created_utc": "2026-01-01T00:00:00Z",
    }
    _write_manifest(folder, manifest)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle")


def test_loads_and_resolves_shapes(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert load_bundle(bundle_dir / "manifest.json").manifest == bundle.manifest
    assert bundle.scales == (1, 2, 3, 4, 6) and bundle.num_scales == 5 and num_positions(bundle.scales) == 66
    assert bundle.spans[3] == (14, 16)
    assert (bundle.batch_max, bundle.candidates, bundle.num_classes, bundle.image_size) == (4, CANDIDATES, 10, 64)
    shapes = bundle.shapes("ar_step", batch=2, scale_index=3)
    assert shapes["x_folded"] == (4, 16, 32)
    assert shapes["past_keys_0"] == shapes["past_values_3"] == (4, 4, 66, 32)  # each layer's (N, H, P, D)
    assert "past_keys_4" not in shapes and bundle.depth == 4
    assert shapes["positions"] == (16,)
    fold = bundle.shapes("fold", batch=2, scale_index=3)  # the fold before the last scale makes its input
    assert fold["x_next"] == (4, 36, 32) and fold["f_hat"] == (2, 32, 6, 6)
    assert bundle.shapes("sampler", 3, 2)["uniforms"] == (3, 9, 2)  # one uniform per token
    assert bundle.shapes("ar_prefill", 3)["cond_start"] == (6, 1, 128)
    assert [bundle.specs[g].served_scales(5) for g in ("ar_prefill", "ar_step", "fold")] == [
        [None],
        [0, 1, 2, 3, 4],
        [0, 1, 2, 3],
    ]
    assert bundle.graph_path("fold") == bundle_dir / "fold.onnx"


def test_missing_file_is_named(bundle_dir):
    (bundle_dir / "ar_step.onnx").unlink()
    for verify in (True, False):
        with pytest.raises(BundleError, match=r"ar_step\.onnx is missing; re-export"):
            load_bundle(bundle_dir, verify=verify)


def test_modified_file_is_named(bundle_dir):
    with (bundle_dir / "sampler.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"sampler\.onnx differs from the manifest.*re-export"):
        load_bundle(bundle_dir)
    load_bundle(bundle_dir, verify=False)  # hashing is what verify adds


def test_same_size_modification_is_caught(bundle_dir):
    path = bundle_dir / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder\.onnx differs"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("old", [3, 4])
def test_an_older_schema_bundle_is_refused_with_the_command_that_re_exports_it(bundle_dir, old):
    """Schema 3 took the cache stacked (4 takes a layer per input); schema 4's sampler takes no reference tokens
    or force mask (5 does): the old graphs cannot be bound."""
    manifest = _manifest(bundle_dir)
    manifest["schema_version"] = old
    _write_manifest(bundle_dir, manifest)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert f"bundle schema {old} is older than this imagefolder (supports {SCHEMA_VERSION})" in str(err.value)
    assert f"`imagefolder-export onnx --out {bundle_dir}`" in str(err.value)


def test_newer_schema_asks_for_an_upgrade(bundle_dir):
    manifest = _manifest(bundle_dir)
    manifest["schema_version"] = SCHEMA_VERSION + 1
    _write_manifest(bundle_dir, manifest)
    expected = (
        f"bundle schema {SCHEMA_VERSION + 1} is newer than this imagefolder (supports {SCHEMA_VERSION}): "
        "upgrade imagefolder"
    )
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert str(err.value) == expected


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format="something-else"), "not an imagefolder bundle"),
        (lambda m: m.pop("sampler_candidates"), "lacks"),
        (lambda m: m["graphs"].pop("fold"), "graphs lacks the field .fold."),
        (lambda m: m.update(dtype="fp16"), "policies"),
        (lambda m: m["graphs"]["sampler"]["inputs"][0].update(name="scores"), "graph sampler I/O differs"),
        (lambda m: m["files"].update({"../outside.onnx": {"sha256": "0", "bytes": 0}}), "outside the bundle"),
    ],
)
def test_malformed_manifests(bundle_dir, edit, message):
    manifest = _manifest(bundle_dir)
    edit(manifest)
    _write_manifest(bundle_dir, manifest)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_onnx_io_must_match_the_manifest(bundle_dir):
    specs = graph_specs(tiny().to_dict())
    (bundle_dir / "ar_step.onnx").write_bytes(_onnx_graph(specs["ar_step"], rename={"past_keys_0": "cache_k"}))
    manifest = _manifest(bundle_dir)
    manifest["files"]["ar_step.onnx"] = _record(bundle_dir, "ar_step.onnx")  # a consistent hash, wrong I/O
    _write_manifest(bundle_dir, manifest)
    with pytest.raises(BundleError, match=r"ar_step\.onnx inputs .*cache_k"):
        load_bundle(bundle_dir)


def test_onnx_fixed_dimension_must_match(bundle_dir):
    specs = graph_specs(tiny().to_dict())
    model = onnx.load_from_string(_onnx_graph(specs["sampler"]))
    model.graph.input[4].type.tensor_type.shape.dim[2].dim_value = 3  # uniforms (B, q, 2) with 3 branches
    onnx.save(model, str(bundle_dir / "sampler.onnx"))
    manifest = _manifest(bundle_dir)
    manifest["files"]["sampler.onnx"] = _record(bundle_dir, "sampler.onnx")
    _write_manifest(bundle_dir, manifest)
    with pytest.raises(BundleError, match=r"sampler\.onnx uniforms is float32 \['B', 'q', 3\]"):
        load_bundle(bundle_dir)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(tmp_path)
