"""The bundle on disk: read and check it (``load_bundle``), and the helpers its writers share.

A bundle is one folder written by ``imagefolder-export onnx``: ``<graph>.onnx`` for every graph in
``core.specs.GRAPH_NAMES`` and ``manifest.json`` (format, schema version, model configuration,
dtype policy, every graph's I/O, and the sha256 of every file except the manifest and ``engines/``).
``load_bundle`` refuses a bundle this version cannot run, or whose files differ from the manifest,
with a message that says what to do. It needs no torch; the ONNX I/O check runs when ``onnx`` is
installed (TensorRT-only targets may not have it). Optional fields, read with a default so that
older schema-2 bundles stay valid: ``weights`` ("fp"; "int8"/"int4" for quantized generator
weights), each graph's ``weights`` record (scheme, stored bytes, and ``compute`` where it multiplies in
integers), ``compute`` ("float"; ``core.specs.COMPUTE_MODES``) and ``provider`` ("any"; the one execution
provider an integer-compute bundle runs on, which ``require_tensorrt`` checks).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagefolder.core import pruning
from imagefolder.core.schedule import scale_spans
from imagefolder.core.specs import (
    COMPUTE_MODES,
    DTYPES,
    GRAPH_NAMES,
    SCHEMA_VERSION,
    WEIGHT_SCHEMES,
    GraphSpec,
    bindings,
    graph_specs,
    resolve_shape,
    state_dtype,
)
from imagefolder.errors import BundleError, OutputError
from imagefolder.io import atomic_write, sha256_file

log = logging.getLogger(__name__)

FORMAT = "imagefolder-bundle"
MANIFEST = "manifest.json"

# ONNX TensorProto element types → the dtype names of the manifest.
_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: where it is, what the manifest says, and the I/O spec of every graph.

    ``specs`` are this version's graph specs for the bundle's model (``load_bundle`` checked that the
    manifest declares exactly them); ``shapes`` resolves their symbols for one batch and scale and
    ``tensor_dtype`` their dtypes for the bundle's state dtype.
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
    def weights(self) -> str:
        """How the big weights are stored: fp, int8 or int4 (optional field; bundles without it are fp)."""
        return self.manifest.get("weights", "fp")

    def graph_weights(self, graph: str) -> str:
        """How one graph's weights are stored: fp, or the bundle's ``weights`` where it quantized them."""
        return self.manifest["graphs"][graph].get("weights", {}).get("scheme", "fp")

    @property
    def compute(self) -> str:
        """How the generator graphs multiply: float, or an integer mode of ``core.specs.COMPUTE_MODES``."""
        return self.manifest.get("compute", "float")

    def graph_compute(self, graph: str) -> str:
        """How one graph multiplies: float, or the bundle's ``compute`` where its products are integer."""
        return self.manifest["graphs"][graph].get("weights", {}).get("compute", "float")

    @property
    def prune(self) -> dict[int, float]:
        """Scale → share of its positions kept (``core/pruning.py``); {} for a dense bundle."""
        return pruning.from_manifest(self.manifest)

    def step_graph(self, scale_index: int) -> str:
        """The step graph that runs ``scale_index``: its own in a pruned bundle, else ``ar_step``."""
        name = pruning.scale_graph_name(scale_index)
        return name if name in self.specs else "ar_step"

    @property
    def provider(self) -> str:
        """The execution provider the bundle is for: "any", or the one whose kernels its graphs need."""
        return self.manifest.get("provider", "any")

    def require_tensorrt(self) -> None:
        """Refuse a bundle TensorRT cannot build: one made for another provider (integer compute)."""
        if self.provider != "any":
            raise BundleError(
                f"{self.path} is for ONNX Runtime's {self.provider} (--compute {self.compute}: integer MatMuls "
                "TensorRT cannot parse); run it with --backend ort, or export without --compute for TensorRT"
            )

    @property
    def state_dtype(self) -> str:
        """numpy dtype of the hidden-state I/O (KV cache, conditioning, f̂, folded input)."""
        return self.manifest["state_dtype"]

    @property
    def batch_max(self) -> int:
        return int(self.manifest["batch_max"])

    @property
    def candidates(self) -> int:
        """Kc: the sampler's TopK size (top-k values above it act as it)."""
        return int(self.manifest["sampler_candidates"])

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.model["generator"]["scales"])

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(first position, count) of every scale."""
        return scale_spans(self.scales)

    @property
    def depth(self) -> int:
        """L: the generator's blocks, each with one keys and one values input in ``ar_step``."""
        return int(self.model["generator"]["depth"])

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

    def tensor_dtype(self, graph: str, name: str) -> str:
        """The numpy dtype name of one tensor of ``graph`` in this bundle."""
        return self.specs[graph].tensor(name).resolved_dtype(self.state_dtype)

    def graph_path(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    def shapes(self, graph: str, batch: int, scale_index: int = 0) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output of ``graph`` for ``batch`` images at ``scale_index``."""
        symbols = bindings(self.scales, batch, scale_index)
        spec = self.specs[graph]
        return {t.name: resolve_shape(t.shape, symbols) for t in spec.inputs + spec.outputs}


def _manifest_io(entry: dict) -> list[list[dict]]:
    return [
        [{"name": t["name"], "dtype": t["dtype"], "shape": list(t["shape"])} for t in entry[kind]]
        for kind in ("inputs", "outputs")
    ]


def onnx_io(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Names, dtypes and shapes of an ONNX file's inputs (initializers excluded) and outputs.

    A dimension is its number when fixed, its symbol name when symbolic, ``"?"`` when unnamed.
    Needs ``onnx``; reads no weights.
    """
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        dtype = _ONNX_DTYPES.get(tensor.elem_type, f"onnx-type-{tensor.elem_type}")
        return {"name": value.name, "dtype": dtype, "shape": dims}

    return {
        "inputs": [describe(v) for v in graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in graph.output],
    }


def _check_onnx_io(bundle: Bundle) -> None:
    """Each graph file declares the manifest's inputs and outputs: names, order, dtypes and ranks.

    A dimension fixed in the file must equal the manifest's (a number where the manifest has a
    symbol means the graph was specialised to one size). A symbolic dimension in the file passes
    whatever its name: exporters name dynamic axes their own way and leave some fixed output
    dimensions symbolic when shape inference stops short.
    """
    try:
        import onnx  # noqa: F401 - only to know whether the check can run
    except ImportError:
        log.info("onnx is not installed: skipping the check of the graphs' I/O against the manifest")
        return
    for name in bundle.specs:
        external = external_data_files(bundle.graph_path(name))
        if external != sorted(bundle.manifest["graphs"][name]["external_data"]):
            raise BundleError(
                f"{bundle.path}: {name}.onnx reads weights from {external}, the manifest lists "
                f"{bundle.manifest['graphs'][name]['external_data']}; re-export the bundle"
            )
        found = onnx_io(bundle.graph_path(name))
        for kind in ("inputs", "outputs"):
            expected = bundle.manifest["graphs"][name][kind]
            if [t["name"] for t in expected] != [f["name"] for f in found[kind]]:
                raise BundleError(
                    f"{bundle.path}: {name}.onnx {kind} {[f['name'] for f in found[kind]]} != manifest "
                    f"{[t['name'] for t in expected]}; re-export the bundle"
                )
            for want, got in zip(expected, found[kind], strict=True):
                fixed_ok = len(got["shape"]) == len(want["shape"]) and all(
                    not isinstance(g, int) or g == w for w, g in zip(want["shape"], got["shape"], strict=True)
                )
                if got["dtype"] != want["dtype"] or not fixed_ok:
                    raise BundleError(
                        f"{bundle.path}: {name}.onnx {want['name']} is {got['dtype']} {got['shape']}, manifest says "
                        f"{want['dtype']} {want['shape']}; re-export the bundle"
                    )
    rows = class_rows(bundle.graph_path("ar_prefill"))
    if rows is not None and rows != bundle.num_classes + 1:
        raise BundleError(
            f"{bundle.path}: the manifest says {bundle.num_classes} classes, but ar_prefill.onnx's class embedding "
            f"has {rows} rows ({rows - 1} classes and the null class); re-export the bundle"
        )


def file_digest(path: str | os.PathLike) -> dict:
    """The manifest entry of one file: sha256 and size."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a part."""
    with atomic_write(Path(path)) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def class_rows(path: str | os.PathLike) -> int | None:
    """Rows of the table that an ``ar_prefill`` graph gathers its ``labels`` from (None if it has no such table).

    Needs ``onnx``; reads no weights.
    """
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    tables = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "labels":
            dims = tables.get(node.input[0])
            if dims:
                return int(dims[0])
    return None


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The files, relative to the graph's folder, that hold an ONNX graph's external weights (sorted)."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    locations = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {item.key: item.value for item in tensor.external_data}
            locations.add(entry.get("location", ""))
    return sorted(locations)


def _tensors(graph) -> Iterator:
    """Every tensor stored in an ONNX graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def check_replaceable(folder: Path) -> None:
    """Refuse to replace ``folder`` unless it is absent, empty, or a bundle (it holds a manifest).

    A new export replaces the whole folder, so pointing ``--out`` at a folder of other files must
    not delete them.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a bundle folder; choose another output folder")
    if (folder / MANIFEST).is_file() or not any(folder.iterdir()):
        return
    raise OutputError(
        f"{folder} is not empty and is not a bundle (it has no {MANIFEST}); an export replaces the whole folder, "
        "so choose a new or empty folder"
    )


# ---------------------------------------------------------------------------------------------------------------------
# The manifest's schema: every field a reader uses, with its type. Checked before anything is used, so a
# manifest edited by hand or damaged gives one message naming the field instead of a traceback.

_FILE_ENTRY = {"sha256": str, "bytes": int}
_TENSOR = {"name": str, "dtype": str, "shape": [(int, str)]}
_GRAPH = {"file": str, "external_data": [str], "inputs": [_TENSOR], "outputs": [_TENSOR]}
_SCHEMA = {
    "format": str,
    "schema_version": int,
    "name": str,
    "model": {
        "tokenizer": {"image_size": int},
        "generator": {
            "scales": [int],
            "num_classes": int,
            "codebook_size": int,
            "num_branches": int,
            "code_dim": int,
            "depth": int,
            "heads": int,
            "width": int,
        },
    },
    "dtype": str,
    "state_dtype": str,
    "opset": int,
    "batch_max": int,
    "sampler_candidates": int,
    "graphs": {name: _GRAPH for name in GRAPH_NAMES},
    "files": {"*": _FILE_ENTRY},
}


def _check_schema(value, schema, where: str) -> None:
    """Raise ``BundleError`` naming the first field of ``value`` that does not have the type ``schema`` says."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise BundleError(f"{where} must be an object, got {type(value).__name__}")
        if "*" in schema:
            for key, item in value.items():
                _check_schema(item, schema["*"], f"{where}.{key}")
            return
        for key, sub in schema.items():
            if key not in value:
                raise BundleError(f"{where} lacks the field {key!r}")
            _check_schema(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise BundleError(f"{where} must be a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check_schema(item, schema[0], f"{where}[{i}]")
    else:
        kinds = schema if isinstance(schema, tuple) else (schema,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise BundleError(f"{where} must be {names}, got {json.dumps(value)[:40]}")


def _check_files(root: Path, manifest: dict, verify: bool) -> None:
    """Every listed file lies inside the bundle and exists (and, with ``verify``, has its size and sha256);
    every file a graph reads, its external weights included, is listed."""
    files = manifest["files"]
    bundle = root.resolve()
    for rel, meta in files.items():
        target = (root / rel).resolve()
        if Path(rel).is_absolute() or bundle not in target.parents:
            raise BundleError(f"{root}: manifest lists {rel!r}, which is outside the bundle folder")
        if not target.is_file():
            raise BundleError(f"{root}: {rel} is missing; re-export the bundle")
        if verify and (target.stat().st_size != meta["bytes"] or sha256_file(target) != meta["sha256"]):
            raise BundleError(f"{root}: {rel} differs from the manifest (sha256 or size); re-export the bundle")
    for name, entry in manifest["graphs"].items():
        for rel in [entry["file"], *entry["external_data"]]:
            if rel not in files:
                raise BundleError(
                    f"{root}: {rel} (read by the {name} graph) is not listed with a sha256; re-export the bundle"
                )


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and check a bundle folder (or its ``manifest.json``).

    Args:
        path: the bundle folder, or the manifest inside it.
        verify: hash every listed file, check the external weights each graph reads, and compare each
            graph's ONNX I/O with the manifest (seconds for the official model); without it only the
            manifest and the presence of the files are checked.
    Returns:
        the loaded ``Bundle``.
    Raises:
        BundleError: with the file or field at fault and what to do about it.
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
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{manifest_path}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is newer than this imagefolder (supports {SCHEMA_VERSION}): upgrade imagefolder"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is older than this imagefolder (supports {SCHEMA_VERSION}): "
            f"re-export the bundle with this version (`imagefolder-export onnx --out {root}`)"
        )
    try:
        _check_schema(manifest, _SCHEMA, "manifest")
    except BundleError as err:
        raise BundleError(f"{manifest_path}: {err}; re-export the bundle") from None
    if manifest["dtype"] not in DTYPES or manifest["state_dtype"] != state_dtype(manifest["dtype"]):
        raise BundleError(
            f"{manifest_path}: dtype {manifest['dtype']!r} with state dtype {manifest['state_dtype']!r} "
            f"is not one of this imagefolder's policies ({', '.join(DTYPES)})"
        )
    if manifest.get("weights", "fp") not in WEIGHT_SCHEMES:
        raise BundleError(
            f"{manifest_path}: weights {manifest['weights']!r} is not one of this imagefolder's formats "
            f"({', '.join(WEIGHT_SCHEMES)}); upgrade imagefolder or re-export the bundle"
        )
    if manifest.get("compute", "float") not in COMPUTE_MODES:
        raise BundleError(
            f"{manifest_path}: compute {manifest['compute']!r} is not one of this imagefolder's modes "
            f"({', '.join(COMPUTE_MODES)}); upgrade imagefolder or re-export the bundle"
        )
    try:
        prune = pruning.from_manifest(manifest)
        pruning.check_prune(prune, manifest["model"]["generator"]["scales"])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{manifest_path}: malformed prune record ({err}); re-export the bundle") from err
    try:
        specs = graph_specs(manifest["model"], prune)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise BundleError(f"{manifest_path}: malformed model configuration ({err!r}); re-export the bundle") from err
    for g in specs:
        if g not in GRAPH_NAMES:  # a scale step graph of a pruned bundle: checked as the others were above
            try:
                _check_schema(manifest["graphs"].get(g), _GRAPH, f"manifest.graphs.{g}")
            except BundleError as err:
                raise BundleError(f"{manifest_path}: {err}; re-export the bundle") from None
        want = [[t.to_dict(manifest["state_dtype"]) for t in ts] for ts in (specs[g].inputs, specs[g].outputs)]
        if _manifest_io(manifest["graphs"][g]) != want:
            raise BundleError(
                f"{manifest_path}: graph {g} I/O differs from schema {SCHEMA_VERSION} of this imagefolder; "
                "re-export the bundle with this version"
            )
    _check_files(root, manifest, verify)
    bundle = Bundle(path=root, manifest=manifest, specs=specs)
    if verify:
        _check_onnx_io(bundle)
    return bundle
