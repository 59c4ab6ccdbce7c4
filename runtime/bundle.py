"""Load an exported bundle: the manifest, its graph specs, and checks that the files are the ones exported.

A bundle is one folder written by ``imagefolder-export onnx``: ``<graph>.onnx`` for every graph in
``export.specs.GRAPH_NAMES`` and ``manifest.json`` (format, schema version, model configuration,
dtype policy, every graph's I/O, and the sha256 of every file except the manifest and ``engines/``).
``load_bundle`` refuses a bundle this version cannot run, or whose files differ from the manifest,
with a message that says what to do. It needs no torch; the ONNX I/O check runs when ``onnx`` is
installed (TensorRT-only targets may not have it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from imagefolder.errors import BundleError
from imagefolder.export.specs import (
    DTYPES,
    GRAPH_NAMES,
    SCHEMA_VERSION,
    GraphSpec,
    TensorSpec,
    bindings,
    graph_specs,
    resolve_shape,
    scale_positions,
    state_dtype,
)
from imagefolder.io import sha256_file

log = logging.getLogger(__name__)

FORMAT = "imagefolder-bundle"
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("name", "model", "dtype", "state_dtype", "opset", "batch_max", "sampler_candidates", "graphs", "files")

# ONNX TensorProto element types → the dtype names of the manifest.
_ONNX_DTYPES = {
    1: "float32", 2: "uint8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64", 16: "bfloat16",
}




@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: where it is, what the manifest says, and the I/O spec of every graph.

    Specs carry concrete dtypes (the manifest's, with the state dtype resolved) and symbolic
    shapes; ``shapes`` resolves them for one batch and scale.
    """

    path: Path
    manifest: dict
    specs: dict[str, GraphSpec]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def model(self) -> dict:
        """``ModelConfig.to_dict()`` of the exported model."""
        return self.manifest["model"]

    @property
    def dtype(self) -> str:
        """Compute precision baked into the graphs: fp32, fp16 or bf16."""
        return self.manifest["dtype"]

    @property
    def state_dtype(self) -> str:
        """numpy dtype of the hidden-state I/O (KV cache, conditioning, f̂, folded input)."""
        return self.manifest["state_dtype"]

    @property
    def batch_max(self) -> int:
        return int(self.manifest["batch_max"])

    @property
    def candidates(self) -> int:
        """Kc: the sampler's TopK size; the noise of one scale is (B, q, branches, Kc)."""
        return int(self.manifest["sampler_candidates"])

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.model["generator"]["scales"])

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def positions(self) -> int:
        """P: positions per branch over all scales."""
        return sum(pn * pn for pn in self.scales)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(first position, count) of every scale."""
        return scale_positions(self.scales)

    @property
    def num_classes(self) -> int:
        """Class labels are in [0, num_classes); ``num_classes`` itself is the null class."""
        return int(self.model["generator"]["num_classes"])

    @property
    def num_branches(self) -> int:
        return int(self.model["generator"]["num_branches"])

    @property
    def codebook_size(self) -> int:
        return int(self.model["generator"]["codebook_size"])

    @property
    def image_size(self) -> int:
        return int(self.model["tokenizer"]["image_size"])

    def graph_path(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    def shapes(self, graph: str, batch: int, scale_index: int = 0) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output of ``graph`` for ``batch`` images at ``scale_index``."""
        symbols = bindings(self.scales, batch, scale_index)
        spec = self.specs[graph]
        return {t.name: resolve_shape(t.shape, symbols) for t in spec.inputs + spec.outputs}


def _spec_from_manifest(name: str, entry: dict) -> GraphSpec:
    def tensors(items: list[dict]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

    return GraphSpec(name, tensors(entry["inputs"]), tensors(entry["outputs"]), entry.get("doc", ""))


def _io(spec: GraphSpec) -> list[list[dict]]:
    """The spec's inputs and outputs in the manifest's form, for comparison."""
    return [[{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]
            for ts in (spec.inputs, spec.outputs)]


def _check_files(root: Path, files: dict) -> None:
    for rel, meta in files.items():
        target = (root / rel).resolve()
        if Path(rel).is_absolute() or root.resolve() not in target.parents:
            raise BundleError(f"{root}: manifest lists {rel!r}, which is outside the bundle folder")
        if not target.is_file():
            raise BundleError(f"{root}: {rel} is missing; re-export the bundle")
        if target.stat().st_size != meta["bytes"] or sha256_file(target) != meta["sha256"]:
            raise BundleError(f"{root}: {rel} differs from the manifest (sha256 or size); re-export the bundle")


def _check_onnx_io(bundle: Bundle) -> None:
    """Each graph file declares the manifest's inputs and outputs: names, order, dtypes and ranks.

    A dimension fixed in the file must equal the manifest's (a number where the manifest has a
    symbol means the graph was specialised to one size). A symbolic dimension in the file passes
    whatever its name: exporters name dynamic axes their own way and leave some fixed output
    dimensions symbolic when shape inference stops short.
    """
    try:
        import onnx
    except ImportError:
        log.info("onnx is not installed: skipping the check of the graphs' I/O against the manifest")
        return
    for name, spec in bundle.specs.items():
        graph = onnx.load(str(bundle.graph_path(name)), load_external_data=False).graph
        initializers = {init.name for init in graph.initializer}
        actual_inputs = [v for v in graph.input if v.name not in initializers]
        for kind, expected, actual in (("inputs", spec.inputs, actual_inputs), ("outputs", spec.outputs, graph.output)):
            found = [_value_info(v) for v in actual]
            if [t.name for t in expected] != [f[0] for f in found]:
                raise BundleError(
                    f"{bundle.path}: {name}.onnx {kind} {[f[0] for f in found]} != manifest "
                    f"{[t.name for t in expected]}; re-export the bundle"
                )
            for t, (_, dtype, shape) in zip(expected, found, strict=True):
                fixed_ok = len(shape) == len(t.shape) and all(
                    not isinstance(got, int) or got == want for want, got in zip(t.shape, shape, strict=True)
                )
                if dtype != t.dtype or not fixed_ok:
                    raise BundleError(
                        f"{bundle.path}: {name}.onnx {t.name} is {dtype} {list(shape)}, manifest says "
                        f"{t.dtype} {list(t.shape)}; re-export the bundle"
                    )


def _value_info(value) -> tuple[str, str, tuple]:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    return value.name, _ONNX_DTYPES.get(tensor.elem_type, f"onnx-type-{tensor.elem_type}"), dims


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle folder (or its ``manifest.json``).

    Args:
        path: the bundle folder, or the manifest inside it.
        verify: hash every listed file and compare each graph's ONNX I/O with the manifest
            (seconds for the official model); without it only presence and the manifest are checked.
    Returns:
        the loaded ``Bundle``.
    Raises:
        BundleError: with the file at fault and what to do about it.
    """
    path = Path(path)
    root = path.parent if path.name == MANIFEST else path
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}; is this a bundle written by `imagefolder-export onnx`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{manifest_path}: unreadable manifest ({err}); re-export the bundle") from err

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an imagefolder bundle (format must be {FORMAT!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{manifest_path}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is newer than this imagefolder (supports {SCHEMA_VERSION}): upgrade imagefolder"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is older than this imagefolder (supports {SCHEMA_VERSION}): "
            "re-export the bundle with this version"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: manifest lacks {missing}; re-export the bundle")
    absent = [g for g in GRAPH_NAMES if g not in manifest["graphs"]]
    if absent:
        raise BundleError(f"{manifest_path}: manifest has no graph {absent}; re-export the bundle")

    if manifest["dtype"] not in DTYPES or manifest["state_dtype"] != state_dtype(manifest["dtype"]):
        raise BundleError(
            f"{manifest_path}: dtype {manifest['dtype']!r} with state dtype {manifest['state_dtype']!r} "
            f"is not one of this imagefolder's policies ({', '.join(DTYPES)})"
        )
    try:
        specs = {g: _spec_from_manifest(g, manifest["graphs"][g]) for g in GRAPH_NAMES}
        expected = graph_specs(manifest["model"], int(manifest["sampler_candidates"]))
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{manifest_path}: malformed manifest ({err!r}); re-export the bundle") from err
    for g in GRAPH_NAMES:
        want = [[t.to_dict(manifest["state_dtype"]) for t in ts] for ts in (expected[g].inputs, expected[g].outputs)]
        if _io(specs[g]) != want:
            raise BundleError(
                f"{manifest_path}: graph {g} I/O differs from schema {SCHEMA_VERSION} of this imagefolder; "
                "re-export the bundle with this version"
            )

    bundle = Bundle(path=root, manifest=manifest, specs=specs)
    for g in GRAPH_NAMES:
        file = manifest["graphs"][g]["file"]
        if file not in manifest["files"]:
            raise BundleError(f"{manifest_path}: graph file {file} is not listed under files; re-export the bundle")
    if verify:
        _check_files(root, manifest["files"])
        _check_onnx_io(bundle)
    else:
        for rel in manifest["files"]:
            if not (root / rel).is_file():
                raise BundleError(f"{root}: {rel} is missing; re-export the bundle")
    return bundle

