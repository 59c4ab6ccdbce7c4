"""The I/O contract of every exported graph, declared once as data.

Export, the bundle manifest, the ONNX Runtime and TensorRT backends, the TensorRT optimization
profiles and the tests all read these specs; a test fails when an exported graph's actual ONNX
inputs or outputs differ from them. This module imports neither torch nor tensorrt.

Symbols in shapes: ``B`` images, ``N`` rows (2B: conditional rows first, then the null class),
``q`` positions of the current scale, ``q_next`` positions of the next scale. Every other dimension
is a number fixed by the model configuration (see ``model_dims``).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 2  # 2: sampler noise per vocabulary entry (B, q, nb, V)

GRAPH_NAMES = ("encoder", "decoder", "ar_prefill", "ar_step", "sampler", "fold")

# dtype names used in specs and the manifest; "state" is resolved to the bundle's state dtype.
FLOAT32, INT32, INT64, STATE = "float32", "int32", "int64", "state"
DTYPES = ("fp32", "fp16", "bf16")
ORT_CPU_DTYPES = ("fp32", "fp16")  # bundle dtypes ONNX Runtime's CPU provider has kernels for


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # float32 | int32 | int64 | state
    shape: tuple[int | str, ...]

    def to_dict(self, state_dtype: str) -> dict:
        dtype = state_dtype if self.dtype == STATE else self.dtype
        return {"name": self.name, "dtype": dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str

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
        "P": sum(pn * pn for pn in scales),
        "K": scales[-1],
        "Z2": gen["code_dim"] * gen["num_branches"],
        "V2": gen["codebook_size"] * gen["num_branches"],
        "L": gen["depth"],
        "Hd": gen["heads"],
        "D": gen["width"] // gen["heads"],
        "C": gen["width"],
        "nb": gen["num_branches"],
    }


def graph_specs(model_config: dict, candidates: int) -> dict[str, GraphSpec]:
    """The specs of all graphs for one model.

    Args:
        model_config: ``ModelConfig.to_dict()``.
        candidates: tokens the sampler keeps per branch before top-k/top-p (its TopK size;
            at most the codebook size, and below TensorRT's TopK limit of 3840). The noise has
            one value per vocabulary entry, so it does not depend on it.
    """
    d = model_dims(model_config)
    img = ("B", 3, d["H_img"], d["H_img"])
    cache = (d["L"], "N", d["Hd"], d["P"], d["D"])
    new_kv = (d["L"], "N", d["Hd"], "q", d["D"])
    cond_blocks = TensorSpec("cond_blocks", STATE, ("N", d["L"], 6, d["C"]))
    cond_head = TensorSpec("cond_head", STATE, ("N", 2, d["C"]))
    fhat = ("B", d["Z2"], d["K"], d["K"])
    specs = [
        GraphSpec(
            "encoder",
            (TensorSpec("image", FLOAT32, img),),
            (TensorSpec("indices", INT32, ("B", d["nb"], d["P"])),),
            "image in [-1, 1] → code indices per branch (0 = detail, 1 = semantic), scales in raster order",
        ),
        GraphSpec(
            "decoder",
            (TensorSpec("indices", INT32, ("B", d["nb"], d["P"])),),
            (TensorSpec("image", FLOAT32, img),),
            "code indices → image in [-1, 1]",
        ),
        GraphSpec(
            "ar_prefill",
            (TensorSpec("labels", INT64, ("N",)),),
            (
                TensorSpec("logits", FLOAT32, ("N", 1, d["V2"])),
                TensorSpec("keys", STATE, (d["L"], "N", d["Hd"], 1, d["D"])),
                TensorSpec("values", STATE, (d["L"], "N", d["Hd"], 1, d["D"])),
                cond_blocks,
                cond_head,
            ),
            "class labels → scale-0 logits, its keys/values, and the per-image AdaLN conditioning",
        ),
        GraphSpec(
            "ar_step",
            (
                TensorSpec("x_folded", STATE, ("N", "q", d["Z2"])),
                TensorSpec("positions", INT64, ("q",)),
                cond_blocks,
                cond_head,
                TensorSpec("past_keys", STATE, cache),
                TensorSpec("past_values", STATE, cache),
            ),
            (
                TensorSpec("logits", FLOAT32, ("N", "q", d["V2"])),
                TensorSpec("keys", STATE, new_kv),
                TensorSpec("values", STATE, new_kv),
            ),
            "one scale: folded input + explicit KV cache → logits and this scale's keys/values",
        ),
        GraphSpec(
            "sampler",
            (
                TensorSpec("logits", FLOAT32, ("N", "q", d["V2"])),
                TensorSpec("guidance", FLOAT32, (1,)),
                TensorSpec("top_k", INT64, (1,)),
                TensorSpec("top_p", FLOAT32, (1,)),
                TensorSpec("noise", FLOAT32, ("B", "q", d["nb"], d["V2"] // d["nb"])),
            ),
            (TensorSpec("tokens", INT32, ("B", "q", d["nb"])),),
            "CFG mix, per-branch top-k/top-p, Gumbel-max with the given uniform noise → tokens",
        ),
        GraphSpec(
            "fold",
            (
                TensorSpec("tokens", INT32, ("B", "q", d["nb"])),
                TensorSpec("f_hat", STATE, fhat),
                TensorSpec("scale_index", INT64, (1,)),
                TensorSpec("next_positions", INT64, ("q_next",)),
            ),
            (
                TensorSpec("f_hat_out", STATE, fhat),
                TensorSpec("x_next", STATE, ("N", "q_next", d["Z2"])),
            ),
            "tokens of one scale + running f̂ → updated f̂ and the next scale's folded input (both CFG halves)",
        ),
    ]
    return {spec.name: spec for spec in specs}


def scale_positions(scales: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, count) of every scale in the concatenated sequence."""
    out, start = [], 0
    for pn in scales:
        out.append((start, pn * pn))
        start += pn * pn
    return out


def bindings(scales: list[int] | tuple[int, ...], batch: int, scale_index: int) -> dict[str, int]:
    """Values of the shape symbols for a batch of images at one scale.

    For the last scale ``q_next`` equals ``q``: the fold's next input is then unused.
    """
    spans = scale_positions(scales)
    q = spans[scale_index][1]
    q_next = spans[min(scale_index + 1, len(scales) - 1)][1]
    return {"B": batch, "N": 2 * batch, "q": q, "q_next": q_next}


def resolve_shape(shape: list | tuple, symbols: dict[str, int]) -> tuple[int, ...]:
    """Replace the symbols of a spec shape by numbers."""
    try:
        return tuple(dim if isinstance(dim, int) else symbols[dim] for dim in shape)
    except KeyError as err:
        raise KeyError(f"shape {list(shape)} uses symbol {err} with no value") from None
