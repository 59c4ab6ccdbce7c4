"""The I/O contract and the behaviour of every exported graph, declared once as data.

Export, the bundle manifest, the ONNX Runtime and TensorRT backends, the TensorRT optimization
profiles, the checks and the tests all read these specs. Besides names, dtypes and shapes, a spec
says which scales its graph serves (``scales``), what each input means (``TensorSpec.role``, from
which ``example_inputs`` makes valid inputs at any batch and scale) and, through its outputs'
roles, how its outputs are compared (``imagefolder.core.compare``). Adding a graph touches its spec
and its module, nothing else. No torch, no onnx.

Symbols in shapes: ``B`` images, ``N`` rows (2B: conditional rows first, then the null class),
``q`` positions of the current scale, ``q_next`` positions of the next scale. Every other dimension
is a number fixed by the model configuration (see ``model_dims``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imagefolder.core.schedule import cfg_rows, guidance, num_positions, positions, scale_spans

# 3: one uniform per token; the prefill computes only the conditioning; ar_step serves scale 0.
# 4: ar_step takes its cache as one (N, Hd, P, D) input per layer (no copy of the cache inside the graph).
# 5: the sampler takes the scale's reference tokens and force mask and returns the reference token where forced.
SCHEMA_VERSION = 5

GRAPH_NAMES = ("encoder", "decoder", "ar_prefill", "ar_step", "sampler", "fold")

# dtype names used in specs and the manifest; "state" is resolved to the bundle's state dtype.
FLOAT32, INT32, INT64, BOOL, STATE = "float32", "int32", "int64", "bool", "state"
DTYPES = ("fp32", "fp16", "bf16")
ORT_CPU_DTYPES = ("fp32", "fp16")  # bundle dtypes ONNX Runtime's CPU provider has kernels for
# How big weights are stored: "fp" in the bundle dtype; "int8" per output channel; "int4" in blocks
# (export/quantize.py). Recorded in the manifest's optional "weights" field, "fp" when absent.
WEIGHT_SCHEMES = ("fp", "int8", "int4")

# Which scales a graph serves: once per batch, whatever the scale ("batch"), every scale ("all"), or
# every scale but the last ("before_last": the fold, whose output feeds the next scale).
SCALE_USES = ("batch", "all", "before_last")

# What a tensor holds; ``example_inputs`` draws inputs by role and ``compare`` picks tolerances by it.
ROLES = (
    "image",
    "indices",
    "labels",
    "tokens",
    "positions",
    "next_positions",
    "scale_index",
    "guidance",
    "top_k",
    "top_p",
    "uniform",
    "reference",
    "force_mask",
    "logits",
    "state",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # float32 | int32 | int64 | bool | state
    shape: tuple[int | str, ...]
    role: str = "state"

    def to_dict(self, state_dtype: str) -> dict:
        dtype = state_dtype if self.dtype == STATE else self.dtype
        return {"name": self.name, "dtype": dtype, "shape": list(self.shape)}

    def resolved_dtype(self, state_dtype: str) -> str:
        return state_dtype if self.dtype == STATE else self.dtype


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str
    scales: str = "batch"  # one of SCALE_USES
    float32_compute: bool = False  # computes in float32 whatever the bundle dtype (ONNX Runtime can check bf16 ones)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name} has no tensor {name!r}")

    def served_scales(self, num_scales: int) -> list[int | None]:
        """The scales this graph runs at (None: once per batch, whatever the scale)."""
        if self.scales == "batch":
            return [None]
        return list(range(max(num_scales - 1, 1) if self.scales == "before_last" else num_scales))


def state_dtype(dtype: str) -> str:
    """numpy dtype of the hidden-state I/O (cache, conditioning, f̂) for a bundle dtype.

    bf16 bundles compute in bf16 but keep fp32 at the graph boundary: numpy and ONNX Runtime's
    Python API have no bfloat16 arrays, and the boundary tensors are small next to the weights.
    """
    return {"fp32": "float32", "fp16": "float16", "bf16": "float32"}[dtype]


def model_dims(model_config: dict) -> dict[str, int]:
    """The fixed dimensions of the graphs, from a ``ModelConfig.to_dict()``."""
    tok, gen = model_config["tokenizer"], model_config["generator"]
    scales = list(gen["scales"])
    return {
        "H_img": tok["image_size"],
        "P": num_positions(scales),
        "K": scales[-1],
        "Z2": gen["code_dim"] * gen["num_branches"],
        "V": gen["codebook_size"],
        "V2": gen["codebook_size"] * gen["num_branches"],
        "L": gen["depth"],
        "Hd": gen["heads"],
        "D": gen["width"] // gen["heads"],
        "C": gen["width"],
        "nb": gen["num_branches"],
    }


def cache_input_names(depth: int) -> tuple[list[str], list[str]]:
    """``ar_step``'s cache inputs, one per layer: (keys of layers 0..L-1, values of layers 0..L-1).

    One input per layer rather than one (L, …) tensor: a runtime binds each layer's slice of its own
    (L, N, Hd, P, D) buffer, while a graph that took the stacked tensor would copy all of it into
    layers at every step (ONNX Runtime's Split: 85 MB per image at d17).
    """
    return [f"past_keys_{layer}" for layer in range(depth)], [f"past_values_{layer}" for layer in range(depth)]


def graph_specs(model_config: dict) -> dict[str, GraphSpec]:
    """The specs of all graphs for one model (``ModelConfig.to_dict()``)."""
    d = model_dims(model_config)
    img = ("B", 3, d["H_img"], d["H_img"])
    layer_cache = ("N", d["Hd"], d["P"], d["D"])
    key_names, value_names = cache_input_names(d["L"])
    new_kv = (d["L"], "N", d["Hd"], "q", d["D"])
    cond_start = TensorSpec("cond_start", STATE, ("N", 1, d["C"]))
    cond_blocks = TensorSpec("cond_blocks", STATE, ("N", d["L"], 6, d["C"]))
    cond_head = TensorSpec("cond_head", STATE, ("N", 2, d["C"]))
    fhat = ("B", d["Z2"], d["K"], d["K"])
    indices = ("B", d["nb"], d["P"])
    specs = [
        GraphSpec(
            "encoder",
            (TensorSpec("image", FLOAT32, img, "image"),),
            (TensorSpec("indices", INT32, indices, "indices"),),
            "image in [-1, 1] → code indices per branch (0 = detail, 1 = semantic), scales in raster order",
        ),
        GraphSpec(
            "decoder",
            (TensorSpec("indices", INT32, indices, "indices"),),
            (TensorSpec("image", FLOAT32, img, "image"),),
            "code indices → image in [-1, 1]",
        ),
        GraphSpec(
            "ar_prefill",
            (TensorSpec("labels", INT64, ("N",), "labels"),),
            (cond_start, cond_blocks, cond_head),
            "class labels → the per-image conditioning: the start token, every block's and the head's AdaLN modulation",
        ),
        GraphSpec(
            "ar_step",
            (
                TensorSpec("x_folded", STATE, ("N", "q", d["Z2"])),
                TensorSpec("positions", INT64, ("q",), "positions"),
                cond_start,
                cond_blocks,
                cond_head,
                *(TensorSpec(name, STATE, layer_cache) for name in key_names + value_names),
            ),
            (
                TensorSpec("logits", FLOAT32, ("N", "q", d["V2"]), "logits"),
                TensorSpec("keys", STATE, new_kv),
                TensorSpec("values", STATE, new_kv),
            ),
            "one scale (scale 0: the start token) + the KV cache, one input per layer → logits, this scale's K/V",
            scales="all",
        ),
        GraphSpec(
            "sampler",
            (
                TensorSpec("logits", FLOAT32, ("N", "q", d["V2"]), "logits"),
                TensorSpec("guidance", FLOAT32, ("B",), "guidance"),
                TensorSpec("top_k", INT64, ("B",), "top_k"),
                TensorSpec("top_p", FLOAT32, ("B",), "top_p"),
                TensorSpec("uniforms", FLOAT32, ("B", "q", d["nb"]), "uniform"),
                TensorSpec("reference_tokens", INT32, ("B", "q", d["nb"]), "reference"),
                TensorSpec("force_mask", BOOL, ("B", "q", d["nb"]), "force_mask"),
            ),
            (TensorSpec("tokens", INT32, ("B", "q", d["nb"]), "tokens"),),
            "CFG mix, per-branch top-k/top-p, a draw by inverse CDF in token-id order with one uniform per token; "
            "where force_mask is set, the reference token instead (conditioned generation)",
            scales="all",
            float32_compute=True,
        ),
        GraphSpec(
            "fold",
            (
                TensorSpec("tokens", INT32, ("B", "q", d["nb"]), "tokens"),
                TensorSpec("f_hat", STATE, fhat),
                TensorSpec("scale_index", INT64, (1,), "scale_index"),
                TensorSpec("next_positions", INT64, ("q_next",), "next_positions"),
            ),
            (
                TensorSpec("f_hat_out", STATE, fhat),
                TensorSpec("x_next", STATE, ("N", "q_next", d["Z2"])),
            ),
            "tokens of one scale + running f̂ → updated f̂ and the next scale's folded input (both CFG halves)",
            scales="before_last",
            float32_compute=True,
        ),
    ]
    return {spec.name: spec for spec in specs}


def bindings(scales: list[int] | tuple[int, ...], batch: int, scale_index: int) -> dict[str, int]:
    """Values of the shape symbols for a batch of images at one scale.

    For the last scale ``q_next`` equals ``q``: the fold's next input is then unused.
    """
    spans = scale_spans(scales)
    q = spans[scale_index][1]
    q_next = spans[min(scale_index + 1, len(scales) - 1)][1]
    return {"B": batch, "N": 2 * batch, "q": q, "q_next": q_next}


def resolve_shape(shape: list | tuple, symbols: dict[str, int]) -> tuple[int, ...]:
    """Replace the symbols of a spec shape by numbers."""
    try:
        return tuple(dim if isinstance(dim, int) else symbols[dim] for dim in shape)
    except KeyError as err:
        raise KeyError(f"shape {list(shape)} uses symbol {err} with no value") from None


def example_inputs(
    spec: GraphSpec,
    model_config: dict,
    batch: int,
    scale_index: int | None,
    rng: np.random.Generator,
    state_dtype: str = "float32",
    candidates: int | None = None,
) -> dict[str, np.ndarray]:
    """Valid inputs of one graph at one (batch, scale), drawn by role, in the graph's dtypes.

    Labels, tokens and indices are in range, positions are the scale's own, the noise is uniform,
    hidden states are standard normal at the scale of real activations. Used by the engine check
    (TensorRT against ONNX Runtime) and the tests; the export's parity check feeds activations
    computed by the real model instead (``export/onnx_export.ExampleInputs``).
    """
    gen = model_config["generator"]
    scales = list(gen["scales"])
    si = 0 if scale_index is None else scale_index
    shapes = {t.name: resolve_shape(t.shape, bindings(scales, batch, si)) for t in spec.inputs}
    num_scales, last = len(scales), len(scales) - 1
    feeds = {}
    for tensor in spec.inputs:
        shape = shapes[tensor.name]
        role = tensor.role
        if role == "labels":
            value = cfg_rows(rng.integers(0, gen["num_classes"], batch), gen["num_classes"])
        elif role in ("tokens", "indices", "reference"):
            value = rng.integers(0, gen["codebook_size"], shape)
        elif role == "positions":
            value = positions(scales, si)
        elif role == "next_positions":
            value = positions(scales, min(si + 1, last))
        elif role == "scale_index":
            value = np.array([si])
        elif role == "image":
            value = rng.random(shape) * 2 - 1
        elif role == "uniform":
            value = rng.random(shape)
        elif role == "force_mask":  # about half the tokens forced: both paths of the selection are exercised
            value = rng.random(shape) < 0.5
        elif role == "guidance":  # a different setting per image: the graphs take them per image
            value = guidance(3.0, max(si, 1), num_scales) * rng.uniform(0.5, 1.5, shape)
        elif role == "top_k":
            value = rng.integers(1, (candidates or gen["codebook_size"]) + 1, shape)
        elif role == "top_p":
            value = rng.uniform(0.5, 1.0, shape)
        elif role == "logits":
            value = 3.0 * rng.standard_normal(shape)
        else:  # hidden states: real activations are O(1)
            value = 0.5 * rng.standard_normal(shape)
        feeds[tensor.name] = np.ascontiguousarray(value, dtype=tensor.resolved_dtype(state_dtype))
    return feeds
