"""torch → ONNX: the export of one graph, and of the whole bundle.

``export_graph`` takes a wrapper module, its ``GraphSpec`` and example inputs, writes the ONNX file
atomically, and checks that the file's I/O equals the spec. ``export_bundle`` exports every graph
of a model into a staging folder, checks each against PyTorch on fresh inputs with ONNX Runtime
(the parity report goes into the manifest, and an error is raised above the dtype's tolerance),
writes ``manifest.json`` last, and only then puts the new bundle in place of the old one in one
step; a lock keeps two exports from writing into the same folder.

We use the TorchScript-based exporter at opset 17: it decomposes attention into MatMul/Softmax,
which every TensorRT 10.x parses (JetPack 6 ships 10.3), where opset ≥ 23 would emit ``Attention``.
It writes opsets up to 20; a higher one (21 for INT4 weights) is reached by ``onnx.version_converter``.
With ``weights`` int8 or int4 the generator's graphs get quantized weights (``export/quantize.py``)
before their parity check, which then allows the error the quantization adds.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import imagefolder
from imagefolder.configs import ModelConfig
from imagefolder.core.bundle import (
    FORMAT,
    MANIFEST,
    check_replaceable,
    external_data_files,
    file_digest,
    onnx_io,
    write_json_atomic,
)
from imagefolder.core.compare import compare_outputs
from imagefolder.core.pruning import check_prune, manifest_record, scale_graph_name, scale_graphs
from imagefolder.core.sampler import default_candidates
from imagefolder.core.schedule import cfg_rows
from imagefolder.core.specs import (
    DTYPES,
    ORT_CPU_DTYPES,
    SCHEMA_VERSION,
    STATE,
    GraphSpec,
    cache_input_names,
    example_inputs,
    graph_specs,
    state_dtype,
)
from imagefolder.errors import ExportError, InputError
from imagefolder.export.graphs import (
    DecoderGraph,
    EncoderGraph,
    FoldGraph,
    PrefillGraph,
    ScaleStepGraph,
    StepGraph,
    with_fusable_gelu,
)
from imagefolder.export.integer import PROVIDER, check_compute, integer_matmuls
from imagefolder.export.onnx_files import TORCHSCRIPT_MAX_OPSET, raise_opset
from imagefolder.export.opcheck import check_operators
from imagefolder.export.quantize import QUANTIZED_GRAPHS, check_weights, default_opset, quantize_graph
from imagefolder.export.weights import WEIGHTS_FILE, pack_weights, weight_report
from imagefolder.io import atomic_write, folder_lock, staged_folder
from imagefolder.models.generator import Generator, KVCache
from imagefolder.models.pruning import ScaleStep
from imagefolder.models.sampler import SamplerGraph
from imagefolder.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRACE_BATCH = 2  # ≥ 2 and distinct from every other dimension, so no batch dimension is specialised
PARITY_BATCH = 3  # ≠ the trace batch: a batch dimension the tracer froze by mistake fails the parity check


# ---------------------------------------------------------------------------------------------
# One graph
# ---------------------------------------------------------------------------------------------


def dynamic_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    """The symbolic dimensions of a spec, in ``torch.onnx.export``'s form."""
    axes = {}
    for tensor in spec.inputs + spec.outputs:
        named = {i: dim for i, dim in enumerate(tensor.shape) if isinstance(dim, str)}
        if named:
            axes[tensor.name] = named
    return axes


def check_io(path: Path, spec: GraphSpec, state_dtype: str) -> None:
    """Raise ``ExportError`` if the ONNX file's I/O differs from the spec."""
    actual = onnx_io(path)
    expected = {
        "inputs": [t.to_dict(state_dtype) for t in spec.inputs],
        "outputs": [t.to_dict(state_dtype) for t in spec.outputs],
    }
    if actual != expected:
        raise ExportError(f"{spec.name}: exported I/O {actual} differs from the spec {expected}")


def stamp_spec_shapes(path: Path, spec: GraphSpec) -> None:
    """Write the spec's shapes onto the graph's inputs and outputs.

    The exporter's shape inference sometimes loses a static dimension behind a Cast (naming it
    e.g. ``Castkeys_dim_2``); the spec knows every dimension, and TensorRT profiles need them.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        shape = spec.tensor(value.name).shape
        if len(dims) != len(shape):
            raise ExportError(f"{spec.name}.{value.name}: rank {len(dims)} differs from the spec {list(shape)}")
        for dim, want in zip(dims, shape, strict=True):
            if isinstance(want, int):
                if dim.dim_value not in (0, want):
                    raise ExportError(f"{spec.name}.{value.name}: dimension {dim.dim_value} where the spec has {want}")
                dim.dim_value = want
            else:
                dim.dim_param = want
    onnx.save(model, str(path))


def export_graph(module: torch.nn.Module, spec: GraphSpec, inputs: tuple, path: Path, opset: int, state_dtype: str):
    """Trace ``module`` on ``inputs`` and write ``path`` atomically; the I/O must equal ``spec``."""
    path = Path(path)
    with atomic_write(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module.eval(),
            inputs,
            str(tmp),
            dynamo=False,
            opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=dynamic_axes(spec),
            do_constant_folding=True,
        )
        stamp_spec_shapes(Path(tmp), spec)
        if opset > TORCHSCRIPT_MAX_OPSET:
            raise_opset(Path(tmp), opset)
        check_io(Path(tmp), spec, state_dtype)


# ---------------------------------------------------------------------------------------------
# Example inputs, shared by tracing and parity checks
# ---------------------------------------------------------------------------------------------


class ExampleInputs:
    """Inputs of any graph at one (batch, scale) that look like the real ones.

    Everything is drawn by role (``core.specs.example_inputs``: labels and tokens in range, the
    scale's own positions, uniform noise) except the hidden states, which the real model computes:
    the conditioning and a cache of real keys and values from a prefill, f̂ from real tokens of the
    earlier scales, and the folded input from that f̂. Returns float32 / int64 torch tensors in
    the spec's input order (the wrappers cast to the state dtype at the boundary).
    """

    def __init__(self, tokenizer: Tokenizer, generator: Generator, model: dict, candidates: int, seed: int = 0):
        self.tok, self.gen, self.model, self.candidates = tokenizer, generator, model, candidates
        self.rng = np.random.default_rng(seed)

    def for_graph(self, spec: GraphSpec, batch: int, scale_index: int | None) -> tuple[torch.Tensor, ...]:
        feeds = example_inputs(spec, self.model, batch, scale_index, self.rng, candidates=self.candidates)
        states = self._hidden_states(spec, batch, 0 if scale_index is None else scale_index)
        return tuple(states.get(t.name, torch.from_numpy(feeds[t.name])) for t in spec.inputs)

    @torch.no_grad()
    def _hidden_states(self, spec: GraphSpec, batch: int, si: int) -> dict[str, torch.Tensor]:
        wanted = {t.name for t in spec.inputs if t.dtype == STATE}
        key_names, value_names = cache_input_names(self.gen.cfg.depth)
        out: dict[str, torch.Tensor] = {}
        if wanted & {"cond_start", "cond_blocks", "cond_head", *key_names, *value_names}:
            cfg = self.gen.cfg
            labels = cfg_rows(self.rng.integers(0, cfg.num_classes, batch), cfg.null_class)
            out["cond_start"], out["cond_blocks"], out["cond_head"] = self.gen.prefill(torch.from_numpy(labels))
            # A full cache of real magnitudes: scale 0's keys and values, each entry a little different.
            empty = KVCache.allocate(cfg, 2 * batch)
            folded = torch.zeros(2 * batch, 1, cfg.folded_dim)
            start = torch.zeros(1, dtype=torch.int64)
            cond = (out["cond_start"], out["cond_blocks"], out["cond_head"])
            _, keys, values = self.gen.step(folded, start, *cond, empty.keys, empty.values)
            for names, first in ((key_names, keys), (value_names, values)):
                noise = torch.from_numpy(self.rng.standard_normal((*first.shape[:3], cfg.positions, first.shape[4])))
                out.update(zip(names, first.repeat(1, 1, 1, cfg.positions, 1) + 0.1 * noise.float(), strict=True))
        if wanted & {"f_hat", "x_folded"}:
            f_hat = self._f_hat(batch, si)
            out["f_hat"] = f_hat
            out["x_folded"] = self.tok.next_scale_input(f_hat, si).repeat(2, 1, 1)
        return {name: value for name, value in out.items() if name in wanted}

    def _f_hat(self, batch: int, si: int) -> torch.Tensor:
        """f̂ after scales 0..si−1 with random tokens."""
        cfg, k = self.gen.cfg, self.tok.cfg.latent_size
        f_hat = torch.zeros(batch, cfg.folded_dim, k, k)
        for s in range(si):
            tokens = self.rng.integers(0, cfg.codebook_size, (batch, cfg.scales[s] ** 2, cfg.num_branches))
            f_hat += self.tok.embed_scale(torch.from_numpy(tokens), s)
        return f_hat


# ---------------------------------------------------------------------------------------------
# Parity: ONNX Runtime against PyTorch
# ---------------------------------------------------------------------------------------------


def check_parity(
    session, reference, inputs: tuple, spec: GraphSpec, dtype: str, weights: str = "fp", compute: str = "float"
) -> dict:
    """Run one graph on ONNX Runtime and its fp32 PyTorch reference on the same inputs; ``compare_outputs``.

    ``weights`` is how the graph's weights are stored (``core.specs.WEIGHT_SCHEMES``) and ``compute`` how it
    multiplies (``core.specs.COMPUTE_MODES``), for the tolerance.
    """
    sdt = state_dtype(dtype)
    feeds = {t.name: x.numpy().astype(t.resolved_dtype(sdt)) for t, x in zip(spec.inputs, inputs, strict=True)}
    actual = dict(zip(spec.output_names, session.run(spec.output_names, feeds), strict=True))
    with torch.no_grad():
        expected = reference(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    expected = {
        t.name: (e.float() if e.is_floating_point() else e).numpy() for t, e in zip(spec.outputs, expected, strict=True)
    }
    return compare_outputs(spec, actual, expected, dtype, reference="torch", weights=weights, compute=compute)


def raise_on_failure(graph: str, report: dict) -> None:
    for output, entry in report.items():
        if not entry["ok"]:
            raise ExportError(
                f"{graph}.{output}: {entry['metric']} {entry['value']:.2e} exceeds the tolerance "
                f"{entry['tolerance']:.0e} against PyTorch; the export is not faithful (report this with the "
                "model and dtype)"
            )


# ---------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "imagefolder": imagefolder.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def graph_modules(
    tokenizer: Tokenizer, generator: Generator, dtype: str, candidates: int, prune: dict[int, float] | None = None
) -> dict[str, tuple]:
    """For each graph: (the module exported in the bundle dtype, its fp32 PyTorch reference); with ``prune``,
    the step graph of every scale that needs its own (``core/pruning.py``)."""
    cd, sd = TORCH_DTYPES[dtype], getattr(torch, state_dtype(dtype))
    tokenizer, generator = tokenizer.eval(), generator.eval()
    tok_c = copy.deepcopy(tokenizer).to(cd)
    gen_c = with_fusable_gelu(copy.deepcopy(generator).to(cd))
    sampler_sizes = (generator.cfg.codebook_size, generator.cfg.num_branches)
    return {
        "encoder": (EncoderGraph(tok_c, cd), EncoderGraph(tokenizer, torch.float32)),
        "decoder": (DecoderGraph(tok_c, cd), DecoderGraph(tokenizer, torch.float32)),
        "ar_prefill": (PrefillGraph(gen_c, sd), PrefillGraph(generator, torch.float32)),
        "ar_step": (StepGraph(gen_c, cd, sd), StepGraph(generator, torch.float32, torch.float32)),
        "sampler": (SamplerGraph(candidates, *sampler_sizes), SamplerGraph(candidates, *sampler_sizes)),
        "fold": (FoldGraph(tokenizer), FoldGraph(tokenizer)),
        **{
            scale_graph_name(si): (
                ScaleStepGraph(ScaleStep(gen_c, si, ratio), cd, sd),
                ScaleStepGraph(ScaleStep(generator, si, ratio), torch.float32, torch.float32),
            )
            for si, ratio in scale_graphs(prune or {}).items()
        },
    }


def trace_and_check_scales(spec: GraphSpec, num_scales: int) -> tuple[int | None, int | None]:
    """Two different scales a graph serves (when it serves several): one to trace at, one to check at.

    A dimension the tracer froze to the traced scale's size then shows up as a parity failure.
    """
    served = spec.served_scales(num_scales)
    trace = served[len(served) // 2]
    check = served[-1] if served[-1] != trace else served[0]
    return trace, check


def export_bundle(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    generator: Generator,
    config: ModelConfig,
    dtype: str = "fp32",
    opset: int | None = None,
    batch_max: int = 8,
    candidates: int | None = None,
    source: dict | None = None,
    progress: bool = True,
    weights: str = "fp",
    compute: str = "float",
    prune: dict[int, float] | None = None,
) -> Path:
    """Export all graphs of a model into the bundle folder ``out_dir``.

    Args:
        out_dir: the bundle folder: absent, empty, or an earlier bundle, which is replaced in one step
            once the new one is complete and checked (a reader sees the old or the new bundle).
        tokenizer, generator: fp32 models (they are copied, never modified).
        config: their ``ModelConfig``.
        dtype: precision baked into the graphs: fp32, fp16 or bf16.
        opset: ONNX opset; default 17 (every graph parseable by TensorRT 10.3), or the lowest the
            weights need (``export.quantize.minimum_opset``: 19 for int8 in fp16/bf16, 21 for int4).
        batch_max: the largest batch the runtime may ask for (recorded; shapes stay dynamic).
        candidates: the sampler's TopK size (default: the codebook, or 1024 when it is ≥ 3840).
        source: provenance recorded in the manifest (checkpoint path and sha256).
        weights: fp, int8 (per output channel) or int4 (blocks): how the generator graphs' big
            MatMul/Gemm weights are stored (``export/quantize.py``).
        compute: float, or int8 / int8-tensor: the generator graphs' int8 weights multiplied in integers on
            ONNX Runtime's CPU provider (``export/integer.py``; needs ``weights`` int8 and ``dtype`` fp32). The
            manifest then names that provider, and TensorRT refuses the bundle.
        prune: scale → share of its positions the trunk runs on (``core/pruning.py``; ``core.pruning.parse_prune``
            reads the command line's form); those scales, and the one before each, get step graphs of their own.
    Returns:
        The bundle folder.
    Raises:
        InputError: a bad dtype, batch_max, candidates or weights, weights the opset cannot express (the
            message names the opset needed), or a compute mode the installed ONNX Runtime lacks.
        OutputError: ``out_dir`` is something else than a bundle, or another export writes into it now.
        ExportError: a graph is not faithful.
    """
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if batch_max < 1:
        raise InputError(f"batch_max must be ≥ 1, got {batch_max}")
    opset = default_opset(weights, dtype) if opset is None else opset
    check_weights(weights, dtype, opset)
    check_compute(compute, weights, dtype)
    prune = dict(sorted((prune or {}).items()))
    check_prune(prune, config.generator.scales)
    candidates = default_candidates(config.generator.codebook_size, candidates)
    out = Path(out_dir)
    with folder_lock(out):
        check_replaceable(out)
        with staged_folder(out) as stage:
            _write_bundle(
                stage,
                tokenizer,
                generator,
                config,
                dtype,
                opset,
                batch_max,
                candidates,
                source,
                progress,
                weights,
                compute,
                prune,
            )
    return out


def _write_bundle(
    out: Path,
    tokenizer: Tokenizer,
    generator: Generator,
    config: ModelConfig,
    dtype: str,
    opset: int,
    batch_max: int,
    candidates: int,
    source: dict | None,
    progress: bool,
    weights: str,
    compute: str,
    prune: dict[int, float],
) -> None:
    """Export every graph into ``out``, store their weights once (``weights.bin``), check each against
    PyTorch as it is on disk, and write the manifest last."""
    import onnx
    import onnxruntime as ort

    model = config.to_dict()
    sdt = state_dtype(dtype)
    specs = graph_specs(model, prune)
    modules = graph_modules(tokenizer, generator, dtype, candidates, prune)
    examples = ExampleInputs(tokenizer, generator, model, candidates)
    num_scales = len(config.generator.scales)
    what = dtype if weights == "fp" else f"{dtype}, {weights} weights"
    what += "" if compute == "float" else f", {compute} compute"
    what += f", pruned {','.join(f'{si}:{r:g}' for si, r in prune.items())}" if prune else ""
    bar = tqdm(total=2 * len(modules), desc=f"export {config.name} ({what})", unit="step", disable=not progress)
    stored: dict[str, dict] = {}  # each graph's weight record: "fp", or what quantize_graph did
    for name, (module, _) in modules.items():
        bar.set_postfix_str(f"trace {name}")
        spec = specs[name]
        trace_si, _ = trace_and_check_scales(spec, num_scales)
        inputs = examples.for_graph(spec, TRACE_BATCH, trace_si)
        sd = getattr(torch, sdt)
        inputs = tuple(x.to(sd) if t.dtype == STATE else x for t, x in zip(spec.inputs, inputs, strict=True))
        path = out / f"{name}.onnx"
        export_graph(module, spec, inputs, path, opset, sdt)
        quantized = weights != "fp" and (name in QUANTIZED_GRAPHS or spec.scales == "one")  # scale steps too
        stored[name] = quantize_graph(path, weights) if quantized else {"scheme": "fp"}
        if quantized and compute != "float":
            stored[name].update(integer_matmuls(path, compute))
        bar.update()
    pack_weights([out / f"{name}.onnx" for name in modules], out)
    graphs: dict[str, dict[str, Any]] = {}
    files = {WEIGHTS_FILE: file_digest(out / WEIGHTS_FILE)}
    for name, (_, reference) in modules.items():
        bar.set_postfix_str(f"check {name}")
        spec, path = specs[name], out / f"{name}.onnx"
        _, check_si = trace_and_check_scales(spec, num_scales)
        if dtype in ORT_CPU_DTYPES:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            inputs = examples.for_graph(spec, PARITY_BATCH, check_si)
            record = stored[name]
            parity = check_parity(
                session, reference, inputs, spec, dtype, record["scheme"], record.get("compute", "float")
            )
            raise_on_failure(name, parity)
        else:
            onnx.checker.check_model(str(path))
            parity = {
                "skipped": f"ONNX Runtime's CPU provider has no {dtype} kernels; check on the GPU with "
                "`imagefolder-export check --backend trt`"
            }
        graphs[name] = {
            "file": path.name,
            "external_data": external_data_files(path),
            "inputs": [t.to_dict(sdt) for t in spec.inputs],
            "outputs": [t.to_dict(sdt) for t in spec.outputs],
            "doc": spec.doc,
            "parity": {"batch": PARITY_BATCH, "scale_index": check_si, "outputs": parity},
            "operators": check_operators(path, "any" if compute == "float" else PROVIDER).to_dict(),
            "weights": stored[name],
        }
        files[path.name] = file_digest(path)
        log.info("exported %s: %s", name, parity)
        bar.update()
    bar.close()
    storage = weight_report(out, {name: entry["file"] for name, entry in graphs.items()})
    for name, entry in graphs.items():
        entry["weights"]["bytes"] = storage["graphs"][name]  # what the graph reads from weights.bin
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "name": config.name,
        "model": model,
        "dtype": dtype,
        "state_dtype": sdt,
        "weights": weights,
        "compute": compute,
        "provider": "any" if compute == "float" else PROVIDER,
        **({"prune": manifest_record(prune, config.generator.scales)} if prune else {}),
        "opset": opset,
        "batch_max": batch_max,
        "sampler_candidates": candidates,
        "graphs": graphs,
        "weight_storage": {"stored_bytes": storage["stored"], "duplicated_bytes": storage["duplicated"]},
        "files": dict(sorted(files.items())),
        "producer": _versions(),
        "source": source or {},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / MANIFEST, manifest)
