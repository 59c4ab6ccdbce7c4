"""torch → ONNX: the generic export of one graph, and the whole bundle.

``export_graph`` takes a wrapper module, its ``GraphSpec`` and example inputs, writes the ONNX file
atomically, and checks that the file's I/O equals the spec. ``export_bundle`` exports every graph
of a model, checks each against PyTorch on fresh inputs with ONNX Runtime (the parity report goes
into the manifest, and an error is raised above the dtype's tolerance), and writes ``manifest.json``
last, so a folder with a manifest is always complete.

We use the TorchScript-based exporter at opset 17: it decomposes attention into MatMul/Softmax,
which every TensorRT 10.x parses (JetPack 6 ships 10.3), where opset ≥ 23 would emit ``Attention``.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import imagefolder
from imagefolder.configs import ModelConfig
from imagefolder.errors import ExportError, InputError
from imagefolder.export import specs as S
from imagefolder.export.bundle_io import file_digest, write_json_atomic
from imagefolder.export.graphs import DecoderGraph, EncoderGraph, FoldGraph, PrefillGraph, StepGraph
from imagefolder.export.opcheck import check_operators
from imagefolder.export.sampler_graph import SamplerGraph
from imagefolder.export.specs import ORT_CPU_DTYPES
from imagefolder.io import atomic_write
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
# Relative error (max |onnx − torch| / max |torch|) allowed per bundle dtype, against fp32 PyTorch.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2}
# Fraction of code indices allowed to differ from PyTorch in the encoder (argmax near-ties flip).
INDEX_TOLERANCE = {"fp32": 0.005, "fp16": 0.1, "bf16": 0.2}
TRT_TOPK_LIMIT = 3840




# ---------------------------------------------------------------------------------------------
# One graph
# ---------------------------------------------------------------------------------------------


def dynamic_axes(spec: S.GraphSpec) -> dict[str, dict[int, str]]:
    """The symbolic dimensions of a spec, in ``torch.onnx.export``'s form."""
    axes = {}
    for tensor in spec.inputs + spec.outputs:
        named = {i: dim for i, dim in enumerate(tensor.shape) if isinstance(dim, str)}
        if named:
            axes[tensor.name] = named
    return axes


def onnx_io(path: Path) -> dict[str, list[dict]]:
    """Names, dtypes and shapes (ints or symbol names) of an ONNX file's inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    elem = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64"}

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": elem.get(t.elem_type, str(t.elem_type)), "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def check_io(path: Path, spec: S.GraphSpec, state_dtype: str) -> None:
    """Raise ``ExportError`` if the ONNX file's I/O differs from the spec."""
    actual = onnx_io(path)
    expected = {
        "inputs": [t.to_dict(state_dtype) for t in spec.inputs],
        "outputs": [t.to_dict(state_dtype) for t in spec.outputs],
    }
    if actual != expected:
        raise ExportError(f"{spec.name}: exported I/O {actual} differs from the spec {expected}")


def stamp_spec_shapes(path: Path, spec: S.GraphSpec) -> None:
    """Write the spec's shapes onto the graph's inputs and outputs.

    The exporter's shape inference sometimes loses a static dimension behind a Cast (naming it
    e.g. ``Castkeys_dim_2``); the spec knows every dimension, and TensorRT profiles need them.
    """
    import onnx

    model = onnx.load(str(path))
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


def export_graph(module: torch.nn.Module, spec: S.GraphSpec, inputs: tuple, path: Path, opset: int, state_dtype: str):
    """Trace ``module`` on ``inputs`` and write ``path`` atomically; the I/O must equal ``spec``."""
    path = Path(path)
    with atomic_write(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module.eval(),
            inputs,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=dynamic_axes(spec),
            do_constant_folding=True,
        )
        stamp_spec_shapes(Path(tmp), spec)
        check_io(Path(tmp), spec, state_dtype)


# ---------------------------------------------------------------------------------------------
# Example inputs, shared by tracing and parity checks
# ---------------------------------------------------------------------------------------------


class ExampleInputs:
    """Realistic inputs for every graph at one (batch, scale): labels through the real prefill,
    a cache filled with real keys of the same magnitude, f̂ from real tokens."""

    def __init__(self, tokenizer: Tokenizer, generator: Generator, candidates: int, seed: int = 0):
        self.tok, self.gen, self.candidates = tokenizer, generator, candidates
        self.rng = torch.Generator().manual_seed(seed)

    def labels(self, batch: int) -> torch.Tensor:
        cfg = self.gen.cfg
        labels = torch.randint(0, cfg.num_classes, (batch,), generator=self.rng)
        return torch.cat([labels, torch.full_like(labels, cfg.null_class)])

    def tokens(self, batch: int, si: int) -> torch.Tensor:
        q, nb = self.gen.cfg.scales[si] ** 2, self.gen.cfg.num_branches
        return torch.randint(0, self.gen.cfg.codebook_size, (batch, q, nb), generator=self.rng, dtype=torch.int32)

    def f_hat(self, batch: int, si: int) -> torch.Tensor:
        k = self.tok.cfg.latent_size
        f_hat = torch.zeros(batch, self.gen.cfg.folded_dim, k, k)
        with torch.no_grad():
            for s in range(si):
                f_hat += self.tok.embed_scale(self.tokens(batch, s).long(), s)
        return f_hat

    def for_graph(self, name: str, batch: int, si: int) -> tuple:
        """Inputs in float32 / int64 (the wrappers cast to the state dtype at the boundary)."""
        cfg = self.gen.cfg
        if name == "encoder":
            return (torch.rand(batch, 3, self.tok.cfg.image_size, self.tok.cfg.image_size, generator=self.rng) * 2 - 1,)
        if name == "decoder":
            p = cfg.positions
            return (torch.randint(0, cfg.codebook_size, (batch, cfg.num_branches, p), generator=self.rng).int(),)
        if name == "ar_prefill":
            return (self.labels(batch),)
        if name == "ar_step":
            with torch.no_grad():
                _, keys, values, cond_blocks, cond_head = self.gen.prefill(self.labels(batch))
            start, q = cfg.scale_offsets[si], cfg.scales[si] ** 2
            reps = cfg.positions
            past_keys = keys.repeat(1, 1, 1, reps, 1) + 0.1 * torch.randn(*keys.shape[:3], reps, keys.shape[4])
            past_values = values.repeat(1, 1, 1, reps, 1) + 0.1 * torch.randn(*keys.shape[:3], reps, keys.shape[4])
            x = self.tok.next_scale_input(self.f_hat(batch, si), si).repeat(2, 1, 1)
            positions = torch.arange(start, start + q)
            return (x, positions, cond_blocks, cond_head, past_keys, past_values)
        if name == "sampler":
            q, v = cfg.scales[si] ** 2, cfg.codebook_size
            logits = 3 * torch.randn(2 * batch, q, 2 * v, generator=self.rng)
            noise = torch.rand(batch, q, cfg.num_branches, v, generator=self.rng)
            return (logits, torch.tensor([1.5]), torch.tensor([min(50, self.candidates)]), torch.tensor([0.9]), noise)
        if name == "fold":
            spans = S.scale_positions(cfg.scales)
            start, q_next = spans[min(si + 1, len(cfg.scales) - 1)]
            next_positions = torch.arange(start, start + q_next)
            return (self.tokens(batch, si), self.f_hat(batch, si), torch.tensor([si]), next_positions)
        raise KeyError(name)


def _cast_floats(inputs: tuple, dtype: torch.dtype) -> tuple:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


# ---------------------------------------------------------------------------------------------
# Parity: ONNX Runtime against PyTorch
# ---------------------------------------------------------------------------------------------


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    scale = float(np.abs(expected).max()) or 1.0
    return diff, diff / scale


def check_parity(session, reference: Callable, inputs: tuple, spec: S.GraphSpec, dtype: str, state_dtype: str) -> dict:
    """Run one graph on ONNX Runtime and the fp32 PyTorch reference on the same inputs.

    Returns per output ``max_abs`` and ``max_rel`` (``mismatch``, the fraction of differing values,
    for integer outputs), the ``tolerance`` of ``dtype`` and ``ok``.
    """
    feeds = {}
    for tensor, value in zip(spec.inputs, inputs, strict=True):
        np_dtype = NUMPY_DTYPES[state_dtype if tensor.dtype == S.STATE else tensor.dtype]
        feeds[tensor.name] = value.numpy().astype(np_dtype)
    actual = session.run(spec.output_names, feeds)
    with torch.no_grad():
        expected = reference(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    report = {}
    for tensor, a, e in zip(spec.outputs, actual, expected, strict=True):
        e = e.float().numpy() if e.is_floating_point() else e.numpy()
        if np.issubdtype(a.dtype, np.integer):
            # The sampler is exact by construction; code choices may flip at near-ties.
            limit = 0.0 if spec.name == "sampler" else INDEX_TOLERANCE[dtype]
            mismatch = float((a != e).mean())
            report[tensor.name] = {"mismatch": mismatch, "tolerance": limit, "ok": mismatch <= limit}
        else:
            max_abs, max_rel = _relative_error(a, e)
            report[tensor.name] = {"max_abs": max_abs, "max_rel": max_rel, "tolerance": TOLERANCE[dtype],
                                   "ok": max_rel <= TOLERANCE[dtype]}
    return report


def raise_on_failure(graph: str, report: dict) -> None:
    for output, entry in report.items():
        if not entry["ok"]:
            measured = entry.get("max_rel", entry.get("mismatch"))
            raise ExportError(
                f"{graph}.{output}: error {measured:.2e} exceeds the tolerance {entry['tolerance']:.0e} "
                "against PyTorch; the export is not faithful (report this with the model and dtype)"
            )


# ---------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------


def default_candidates(codebook_size: int, requested: int | None = None) -> int:
    """Sampler TopK size: the whole codebook when TensorRT allows it, else 1024 (≥ the official top-k 750)."""
    if requested is not None:
        if not 1 <= requested <= min(codebook_size, TRT_TOPK_LIMIT - 1):
            raise InputError(f"--candidates must be in [1, {min(codebook_size, TRT_TOPK_LIMIT - 1)}], got {requested}")
        return requested
    return codebook_size if codebook_size < TRT_TOPK_LIMIT else 1024


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"imagefolder": imagefolder.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def graph_plan(tokenizer: Tokenizer, generator: Generator, dtype: str, candidates: int) -> dict[str, tuple]:
    """For each graph: (wrapper in the bundle dtype, fp32 PyTorch reference, trace scale, check scale).

    Tracing and checking use different scales and batch sizes, so a dimension that the tracer
    froze by mistake shows up as a parity failure.
    """
    import copy

    cd, sd = TORCH_DTYPES[dtype], getattr(torch, S.state_dtype(dtype))
    tokenizer, generator = tokenizer.eval(), generator.eval()
    tok_c = copy.deepcopy(tokenizer).to(cd)
    gen_c = copy.deepcopy(generator).to(cd)
    num_scales = len(generator.cfg.scales)
    mid = num_scales // 2
    return {
        "encoder": (EncoderGraph(tok_c, cd), EncoderGraph(tokenizer, torch.float32), 0, 0),
        "decoder": (DecoderGraph(tok_c, cd), DecoderGraph(tokenizer, torch.float32), 0, 0),
        "ar_prefill": (PrefillGraph(gen_c, sd), PrefillGraph(generator, torch.float32), 0, 0),
        "ar_step": (StepGraph(gen_c, cd, sd), StepGraph(generator, torch.float32, torch.float32), mid, mid + 1),
        "sampler": (SamplerGraph(candidates), SamplerGraph(candidates), mid, mid + 1),
        "fold": (FoldGraph(tokenizer), FoldGraph(tokenizer), mid, num_scales - 1),
    }


def export_bundle(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    generator: Generator,
    config: ModelConfig,
    dtype: str = "fp32",
    opset: int = 17,
    batch_max: int = 8,
    candidates: int | None = None,
    source: dict | None = None,
    progress: bool = True,
) -> Path:
    """Export all graphs of a model into ``out_dir`` and write its manifest.

    Args:
        out_dir: bundle folder (created; existing graphs are replaced atomically).
        tokenizer, generator: fp32 models (they are copied, never modified).
        config: their ``ModelConfig``.
        dtype: precision baked into the graphs: fp32, fp16 or bf16.
        opset: ONNX opset (17 keeps every graph parseable by TensorRT 10.3).
        batch_max: the largest batch the runtime may ask for (recorded; shapes stay dynamic).
        candidates: the sampler's TopK size (default: the codebook, or 1024 when it is ≥ 3840).
        source: provenance recorded in the manifest (checkpoint path and sha256).
    Returns:
        The bundle folder.
    """
    import onnx
    import onnxruntime as ort

    if dtype not in S.DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(S.DTYPES)}")
    if batch_max < 1:
        raise InputError("batch_max must be ≥ 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a folder without a manifest is an unfinished export
    model_dict = config.to_dict()
    candidates = default_candidates(config.generator.codebook_size, candidates)
    state_dtype = S.state_dtype(dtype)
    specs = S.graph_specs(model_dict, candidates)
    sd = getattr(torch, state_dtype)
    plan = graph_plan(tokenizer, generator, dtype, candidates)
    examples = ExampleInputs(tokenizer, generator, candidates)
    graphs = {}
    bar = tqdm(plan.items(), desc=f"export {config.name} ({dtype})", unit="graph", disable=not progress)
    for name, (wrapper, reference, trace_si, check_si) in bar:
        bar.set_postfix_str(name)
        spec = specs[name]
        path = out / f"{name}.onnx"
        trace_batch = 2  # ≥ 2 and distinct from other dims, so no batch dimension is specialised
        inputs = examples.for_graph(name, trace_batch, trace_si)
        state_inputs = tuple(
            _cast_floats((x,), sd)[0] if t.dtype == S.STATE else x for t, x in zip(spec.inputs, inputs, strict=True)
        )
        export_graph(wrapper, spec, state_inputs, path, opset, state_dtype)
        if dtype in ORT_CPU_DTYPES:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            check_inputs = examples.for_graph(name, 3, check_si)
            parity = check_parity(session, reference, check_inputs, spec, dtype, state_dtype)
            raise_on_failure(name, parity)
        else:
            onnx.checker.check_model(str(path))
            parity = {"skipped": f"ONNX Runtime's CPU provider has no {dtype} kernels; check on the GPU with "
                                 "`imagefolder-export check --backend trt`"}
        graphs[name] = {
            "file": path.name,
            "inputs": [t.to_dict(state_dtype) for t in spec.inputs],
            "outputs": [t.to_dict(state_dtype) for t in spec.outputs],
            "doc": spec.doc,
            "parity": {"batch": 3, "scale_index": check_si, "outputs": parity},
            "operators": check_operators(path).to_dict(),
        }
        log.info("exported %s: %s", name, parity)
    files = {p.name: file_digest(p) for p in sorted(out.glob("*.onnx")) if p.stem in plan}
    manifest = {
        "format": "imagefolder-bundle",
        "schema_version": S.SCHEMA_VERSION,
        "name": config.name,
        "model": model_dict,
        "dtype": dtype,
        "state_dtype": state_dtype,
        "opset": opset,
        "batch_max": batch_max,
        "sampler_candidates": candidates,
        "graphs": graphs,
        "files": files,
        "producer": _versions(),
        "source": source or {},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out
