"""The sampler before and after bundle schema 3, side by side in one process, at the official d17 shapes.

Schema 2 drew one uniform per vocabulary entry on the host, (B, q, 2, V) per scale, and picked by
Gumbel-max (CumSum for top-p); schema 3 draws one uniform per token, (B, P, 2) per image, and picks by
inverse CDF in token-id order (blocked matmuls, ScatterElements). Both graphs are exported here and
run on ONNX Runtime's CPU provider with runs interleaved (old, new, old, new, ...), so the drift of a
shared machine hits both alike; the host's cost of drawing the uniforms is measured the same way.

    python bench/sampler_latency.py                 # d17: V = 4096, Kc = 1024, batch 1 and 8
    python bench/sampler_latency.py --runs 11
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

from imagefolder.configs import from_name
from imagefolder.core.sampler import image_uniforms
from imagefolder.core.schedule import num_positions
from imagefolder.models.sampler import SamplerGraph


class Schema2Sampler(nn.Module):
    """The schema-2 sampler (bundles before 2026-12), kept here as the baseline: Gumbel-max with
    one uniform per vocabulary entry, CumSum for the top-p mass."""

    def __init__(self, candidates: int, branches: int = 2):
        super().__init__()
        self.candidates, self.branches = candidates, branches
        self.register_buffer("ranks", torch.arange(candidates), persistent=False)

    def forward(self, logits, guidance, top_k, top_p, noise):
        cond, uncond = logits.unflatten(-1, (self.branches, -1)).chunk(2, dim=0)
        mixed = (1.0 + guidance) * cond - guidance * uncond
        vals, idx = torch.topk(mixed, self.candidates, dim=-1, largest=True, sorted=True)
        keep_k = (self.ranks < top_k) | (self.ranks == 0)
        masked = torch.where(keep_k, vals, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        keep = keep_k & ((torch.cumsum(probs, dim=-1) - probs < top_p) | (top_p >= 1.0))
        u = torch.gather(noise, -1, idx).clamp(1e-20, 1.0 - 2.0**-24)
        score = torch.where(keep, masked, float("-inf")) - torch.log(-torch.log(u))
        return torch.gather(idx, -1, torch.argmax(score, dim=-1, keepdim=True)).squeeze(-1).to(torch.int32)


def export(module: nn.Module, inputs: dict[str, np.ndarray], path: Path) -> ort.InferenceSession:
    names = list(inputs)
    dynamic = {n: {0: "B"} for n in names}
    dynamic["logits"] = {0: "N", 1: "q"}
    for per_token in {"noise", "uniforms", "reference_tokens", "force_mask"} & set(names):
        dynamic[per_token] = {0: "B", 1: "q"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(v) for v in inputs.values()),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["tokens"],
            dynamic_axes=dynamic,
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def feeds(schema: int, batch: int, q: int, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    logits = (3 * rng.standard_normal((2 * batch, q, 2 * vocab))).astype(np.float32)
    per = (1,) if schema == 2 else (batch,)
    out: dict[str, np.ndarray] = {
        "logits": logits,
        "guidance": np.full(per, 1.5, np.float32),
        "top_k": np.full(per, 750, np.int64),
        "top_p": np.full(per, 0.95, np.float32),
    }
    if schema == 2:
        out["noise"] = rng.random((batch, q, 2, vocab), dtype=np.float32)
    else:  # schema 3's inputs, and schema 5's reference tokens with nothing forced (the same work)
        out["uniforms"] = rng.random((batch, q, 2), dtype=np.float32)
        out["reference_tokens"] = np.zeros((batch, q, 2), np.int32)
        out["force_mask"] = np.zeros((batch, q, 2), bool)
    return out


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="imagefolder-d17")
    parser.add_argument("--candidates", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    gen = from_name(args.preset).generator
    vocab, scales, positions = gen.codebook_size, gen.scales, num_positions(gen.scales)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    sessions = {
        2: export(Schema2Sampler(args.candidates), feeds(2, 2, 4, vocab, rng), tmp / "schema2.onnx"),
        3: export(SamplerGraph(args.candidates, vocab), feeds(3, 2, 4, vocab, rng), tmp / "schema3.onnx"),
    }
    print(f"{args.preset}: V = {vocab}, Kc = {args.candidates}, ONNX Runtime CPU, median of {args.runs} runs")
    for batch in (1, 8):
        print(f"\nbatch {batch}: sampler graph per scale (ms)")
        print(f"{'scale':>5} {'q':>4} {'schema 2':>9} {'schema 3':>9} {'2 / 3':>7}")
        totals = {2: 0.0, 3: 0.0}
        for si, pn in enumerate(scales):
            q = pn * pn
            inputs = {s: feeds(s, batch, q, vocab, rng) for s in (2, 3)}
            for s in (2, 3):
                sessions[s].run(None, inputs[s])  # warm-up
            ms: dict[int, list[float]] = {2: [], 3: []}
            for _ in range(args.runs):
                for s in (2, 3):  # interleaved
                    ms[s].append(median_ms(lambda s=s, feeds=inputs[s]: sessions[s].run(None, feeds), 1))
            med = {s: statistics.median(v) for s, v in ms.items()}
            totals[2] += med[2]
            totals[3] += med[3]
            print(f"{si:>5} {q:>4} {med[2]:>9.2f} {med[3]:>9.2f} {med[2] / med[3]:>7.2f}")
        print(f"{'all':>5} {positions:>4} {totals[2]:>9.2f} {totals[3]:>9.2f} {totals[2] / totals[3]:>7.2f}")

        def draw_schema2(batch=batch):
            draw = np.random.default_rng(0)
            return [draw.random((batch, pn * pn, 2, vocab), dtype=np.float32) for pn in scales]

        def draw_schema3(batch=batch):
            return [image_uniforms(0, i, positions, 2) for i in range(batch)]

        host2, host3 = median_ms(draw_schema2, args.runs), median_ms(draw_schema3, args.runs)
        bytes2, bytes3 = batch * positions * 2 * vocab * 4, batch * positions * 2 * 4
        print(
            f"host uniforms per generation: schema 2 {host2:.2f} ms ({bytes2 / 1e6:.1f} MB), "
            f"schema 3 {host3:.3f} ms ({bytes3 / 1e3:.1f} KB)"
        )


if __name__ == "__main__":
    main()
