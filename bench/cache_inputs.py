"""``ar_step`` with the cache as one stacked input (schema 3) against one input per layer (schema 4).

Schema 3's graph took keys and values as (L, N, H, P, D) tensors and indexed each layer inside the
graph, which ONNX Runtime executes as a copy of the whole cache at every step (Split). Schema 4's
graph takes each layer as its own input, which the runtime binds as a view of its buffer. Both
graphs are exported here from one generator (the preset's architecture, random weights, the same
fused GELU as the bundle), bound to the same buffers through IO binding as ``OrtBackend`` binds
them (two threads, spinning off), checked for equal logits, and timed scale by scale, alternating.

    python -m bench.cache_inputs --batch 1 --runs 8
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.bundles import load_models
from imagefolder.configs import PRESETS
from imagefolder.core.schedule import scale_spans
from imagefolder.core.specs import cache_input_names
from imagefolder.export.graphs import StepGraph, with_fusable_gelu
from imagefolder.models.generator import Generator

COMMON = ["x_folded", "positions", "cond_start", "cond_blocks", "cond_head"]
OUTPUTS = ["logits", "keys", "values"]


class StackedStep(torch.nn.Module):
    """Schema 3's step graph: the cache as two (L, N, H, P, D) inputs."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, x_folded, positions, cond_start, cond_blocks, cond_head, past_keys, past_values):
        return self.generator.step(x_folded, positions, cond_start, cond_blocks, cond_head, past_keys, past_values)


def export_both(generator: Generator, folder: Path) -> dict[str, Path]:
    """Both step graphs of ``generator``, traced at 2 images and scale 2, with dynamic rows and positions."""
    cfg = generator.cfg
    depth, rows, q = cfg.depth, 4, 9
    cache_shape = (depth, rows, cfg.heads, cfg.positions, cfg.width // cfg.heads)
    states = (
        torch.rand(rows, q, cfg.folded_dim),
        torch.arange(5, 5 + q),
        torch.rand(rows, 1, cfg.width),
        torch.rand(rows, depth, 6, cfg.width),
        torch.rand(rows, 2, cfg.width),
    )
    keys, values = torch.rand(cache_shape), torch.rand(cache_shape)
    dynamic = {name: {0: "N"} for name in COMMON[2:]} | {"x_folded": {0: "N", 1: "q"}, "positions": {0: "q"}}
    dynamic |= {"logits": {0: "N", 1: "q"}, "keys": {1: "N", 3: "q"}, "values": {1: "N", 3: "q"}}
    key_names, value_names = cache_input_names(depth)
    forms: dict[str, tuple[torch.nn.Module, tuple, list[str], dict[int, str]]] = {
        "stacked": (StackedStep(generator), (*states, keys, values), ["past_keys", "past_values"], {1: "N"}),
        "per_layer": (
            StepGraph(generator, torch.float32, torch.float32),
            (*states, *keys, *values),
            key_names + value_names,
            {0: "N"},
        ),
    }
    paths = {}
    for form, (module, inputs, cache_names, cache_axes) in forms.items():
        paths[form] = folder / f"{form}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                module.eval(),
                inputs,
                str(paths[form]),
                dynamo=False,
                opset_version=17,
                input_names=COMMON + cache_names,
                output_names=OUTPUTS,
                dynamic_axes=dynamic | {name: cache_axes for name in cache_names},
            )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="imagefolder-d17", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    if args.batch < 1 or args.runs < 1:
        parser.error("--batch and --runs must be ≥ 1")

    generator = with_fusable_gelu(copy.deepcopy(load_models(args.preset).generator)).eval()
    cfg, rows, rng = generator.cfg, 2 * args.batch, np.random.default_rng(0)
    depth, heads, head_dim = cfg.depth, cfg.heads, cfg.width // cfg.heads
    cache = rng.random((2, depth, rows, heads, cfg.positions, head_dim), np.float32)
    cond: dict[str, np.ndarray] = {
        "cond_start": rng.random((rows, 1, cfg.width), np.float32),
        "cond_blocks": rng.random((rows, depth, 6, cfg.width), np.float32),
        "cond_head": rng.random((rows, 2, cfg.width), np.float32),
    }
    key_names, value_names = cache_input_names(depth)
    cache_feeds: dict[str, dict[str, np.ndarray]] = {
        "stacked": {"past_keys": cache[0], "past_values": cache[1]},
        "per_layer": dict(zip(key_names, cache[0], strict=True)) | dict(zip(value_names, cache[1], strict=True)),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    spans = scale_spans(cfg.scales)
    with tempfile.TemporaryDirectory() as folder:
        paths = export_both(generator, Path(folder))
        sessions = {form: ort.InferenceSession(str(path), options) for form, path in paths.items()}
        arrays: list[dict] = []  # every bound buffer stays alive while its binding runs
        bindings: dict[tuple[str, int], tuple[ort.IOBinding, dict[str, np.ndarray]]] = {}
        for si, (start, q) in enumerate(spans):
            step: dict[str, np.ndarray] = {
                "x_folded": rng.random((rows, q, cfg.folded_dim), np.float32),
                "positions": np.arange(start, start + q),
            }
            for form, session in sessions.items():
                outputs = {
                    "logits": np.empty((rows, q, 2 * cfg.codebook_size), np.float32),
                    "keys": np.empty((depth, rows, heads, q, head_dim), np.float32),
                    "values": np.empty((depth, rows, heads, q, head_dim), np.float32),
                }
                binding = session.io_binding()
                for name, array in (step | cond | cache_feeds[form]).items():
                    binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
                for name, array in outputs.items():
                    binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
                arrays += [step, outputs]
                bindings[form, si] = binding, outputs
            for form, session in sessions.items():
                session.run_with_iobinding(bindings[form, si][0])
            error = np.abs(bindings["stacked", si][1]["logits"] - bindings["per_layer", si][1]["logits"]).max()
            if error > 1e-4:
                raise SystemExit(f"step[{si}]: the two graphs' logits differ by {error:.2e}")
        times: dict[tuple[str, int], list[float]] = {key: [] for key in bindings}
        for _ in range(args.runs):
            for si in range(len(spans)):
                for form, session in sessions.items():
                    time.sleep(0.05)  # the other graph's worker threads go idle
                    begin = time.perf_counter()
                    session.run_with_iobinding(bindings[form, si][0])
                    times[form, si].append((time.perf_counter() - begin) * 1e3)
    print(f"{args.preset}, batch {args.batch}, p50 of {args.runs} alternating runs")
    print("| step | stacked ms | per layer ms | stacked / per layer |\n| --- | ---: | ---: | ---: |")
    totals = {"stacked": 0.0, "per_layer": 0.0}
    for si in range(len(spans)):
        medians = {form: float(np.median(times[form, si])) for form in totals}
        for form in totals:
            totals[form] += medians[form]
        ratio = medians["stacked"] / medians["per_layer"]
        print(f"| step[{si}] | {medians['stacked']:.1f} | {medians['per_layer']:.1f} | {ratio:.3f} |")
    ratio = totals["stacked"] / totals["per_layer"]
    print(f"| all steps | {totals['stacked']:.1f} | {totals['per_layer']:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
