"""Job ``folding``: the paper's claim, measured. Folding two tokens into one position halves the sequence;
what does that save per step and per image?

What is compared, at batch 1 (2 rows with guidance), on ONNX Runtime (the ``ar_step`` graph in a session
with the ort backend's own options, CPU) and PyTorch (``Generator.step``), runs interleaved:

- folded: the preset's generator as it is: P positions (286 at d17) of two tokens each (the 2V-logit
  head, a 2Z-channel input), ten steps of q_s = pn_s² positions;
- unfolded: the same width, depth, heads, V and Z with one token per position (``num_branches = 1``,
  a head of V logits, a Z-channel input): 2P positions (572), ten steps of exactly 2·q_s positions,
  each step attending to a cache of 2P.
  ``Generator`` lays its positions out as square scales, so its scales are only a container for 2P
  positions (a sum of squares, ``squares_summing_to``); the steps feed contiguous runs of 2·q_s
  positions, which is what a generator that unfolds each position into two consecutive ones does.

Only the step differs: the prefill (same width and depth), the sampler and the fold (the same 2P tokens
drawn and folded) cost the same in both, so per image = the sum of the ten steps. The cache and the
inputs are fixed (random) and not updated between steps: the same work in both, no copy measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from bench import calibrate, cost
from bench.context import Context
from bench.report import JobResult, ms, ratio, table
from bench.timing import PAUSE_S, Plan
from imagefolder.configs import ModelConfig
from imagefolder.core.specs import SCHEMA_VERSION, cache_input_names, example_inputs, graph_specs
from imagefolder.export.graphs import StepGraph
from imagefolder.export.onnx_export import export_graph
from imagefolder.io import atomic_write_text
from imagefolder.models.generator import Generator

TRACE_Q = 7  # positions of the traced step: distinct from every other dimension, so none is frozen


def squares_summing_to(total: int) -> tuple[int, ...]:
    """Sides of squares whose areas sum to ``total`` (greedy, largest first), in increasing order."""
    sides = []
    while total:
        side = math.isqrt(total)
        sides.append(side)
        total -= side * side
    return tuple(sorted(sides))


def unfolded_config(config: ModelConfig) -> ModelConfig:
    """The preset with one token per position: 2P positions, one branch, the rest unchanged."""
    scales = squares_summing_to(2 * config.generator.positions)
    gen = dataclasses.replace(config.generator, num_branches=1, scales=scales)
    tok = dataclasses.replace(config.tokenizer, num_branches=1, scales=scales)
    return ModelConfig(name=f"{config.name}-unfolded", tokenizer=tok, generator=gen)


@dataclasses.dataclass
class Variant:
    """One generator's steps: the q of each, and a runner per backend that times them all."""

    config: ModelConfig
    steps: list[int]
    runners: dict  # backend -> callable returning the ms of every step


def _spans(steps: list[int]) -> list[tuple[int, int]]:
    starts = np.cumsum([0, *steps[:-1]])
    return [(int(s), q) for s, q in zip(starts, steps, strict=True)]


def _feeds(config: ModelConfig, steps: list[int]) -> list[dict[str, np.ndarray]]:
    """The ``ar_step`` inputs of every step at batch 1 (random states, the step's positions)."""
    model = config.to_dict()
    spec = graph_specs(model)["ar_step"]
    base = example_inputs(spec, model, 1, 0, np.random.default_rng(0))
    out = []
    for start, q in _spans(steps):
        feeds = dict(base)
        feeds["positions"] = np.arange(start, start + q, dtype=np.int64)
        feeds["x_folded"] = np.zeros((2, q, config.generator.folded_dim), np.float32)
        out.append(feeds)
    return out


def _timed_steps(call, feeds: list[dict]) -> list[float]:
    times = []
    for step_feeds in feeds:
        start = time.perf_counter_ns()
        call(step_feeds)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def _runners(session: ort.InferenceSession, generator: Generator, feeds: list[dict]) -> dict:
    tensors = [{name: torch.from_numpy(value) for name, value in f.items()} for f in feeds]
    key_names, value_names = cache_input_names(generator.cfg.depth)

    @torch.no_grad()
    def torch_step(f: dict) -> None:
        cache = [f[name] for name in key_names], [f[name] for name in value_names]
        generator.step(f["x_folded"], f["positions"], f["cond_start"], f["cond_blocks"], f["cond_head"], *cache)

    return {
        "ort": lambda: _timed_steps(lambda f: session.run(None, f), feeds),
        "torch": lambda: _timed_steps(torch_step, tensors),
    }


def _unfolded(ctx: Context) -> Variant:
    """The unfolded generator (random weights, seed 0) and its step graph, exported into the work folder
    once and reused while the configuration is the same."""
    config = unfolded_config(ctx.models().config)
    torch.manual_seed(0)
    generator = Generator(config.generator).eval()
    # Generator's head always predicts two tokens (2V logits); one token per position needs V.
    generator.head = torch.nn.Linear(config.generator.width, config.generator.codebook_size)
    folder = ctx.options.workdir / config.name
    path, described = folder / "ar_step.onnx", folder / "config.json"
    record = {"schema_version": SCHEMA_VERSION, "model": config.to_dict()}  # the graph's I/O follows the schema
    if path.exists() and described.exists() and json.loads(described.read_text()) == _jsonable(record):
        ctx.say(f"reusing {path}")
    else:
        ctx.say(f"exporting the unfolded step graph ({config.generator.positions} positions, one token each)")
        model = config.to_dict()
        spec = graph_specs(model)["ar_step"]
        trace = example_inputs(spec, model, 2, 0, np.random.default_rng(1))
        trace["positions"] = np.arange(1, 1 + TRACE_Q, dtype=np.int64)
        trace["x_folded"] = np.zeros((4, TRACE_Q, config.generator.folded_dim), np.float32)
        module = StepGraph(generator, torch.float32, torch.float32)
        export_graph(module, spec, tuple(torch.from_numpy(trace[t.name]) for t in spec.inputs), path, 17, "float32")
        atomic_write_text(described, json.dumps(record))
    steps = [2 * pn * pn for pn in ctx.models().config.generator.scales]
    return Variant(config, steps, _runners(ctx.ort().open_graph(path), generator, _feeds(config, steps)))


def _jsonable(data: dict) -> dict:
    return json.loads(json.dumps(data))


def _folded(ctx: Context) -> Variant:
    config = ctx.models().config
    steps = [pn * pn for pn in config.generator.scales]
    session = ctx.ort().open_graph(ctx.bundle().graph_path("ar_step"))
    return Variant(config, steps, _runners(session, ctx.models().generator, _feeds(config, steps)))


def _floors(ctx: Context, variants: dict[str, Variant]) -> dict[str, list[calibrate.StageFloor]]:
    """The floor of every step of both variants (products the calibration has not timed are timed now)."""
    calib = ctx.calibrated()
    costs = {}
    for name, variant in variants.items():
        levels = [len(set(_levels(variant.config, start, q))) for start, q in _spans(variant.steps)]
        costs[name] = [
            cost.step_cost(variant.config, 1, q, levels=lv) for q, lv in zip(variant.steps, levels, strict=True)
        ]
    missing = [s for s in cost.distinct_gemms(c for cs in costs.values() for c in cs) if s not in calib.gemm_gflops]
    calib.gemm_gflops.update(calibrate.gemm_gflops(missing, calib.threads, calib.min_s))
    return {
        name: [calibrate.stage_floor(c, calib.gemm_gflops, calib.memory_gbs) for c in cs] for name, cs in costs.items()
    }


def _levels(config: ModelConfig, start: int, q: int) -> list[int]:
    levels = [si for si, pn in enumerate(config.generator.scales) for _ in range(pn * pn)]
    return levels[start : start + q]


def prepare(ctx: Context) -> None:
    ctx.prepared["folding"] = {"folded": _folded(ctx), "unfolded": _unfolded(ctx)}


def run(ctx: Context) -> JobResult:
    allot = ctx.budget.allot("folding")
    torch.set_num_threads(ctx.options.threads)
    variants: dict[str, Variant] = ctx.prepared.pop("folding")
    floors = _floors(ctx, variants)
    times = _measure(ctx, variants, allot)
    names, backends = ("folded", "unfolded"), ("ort", "torch")
    p50 = {key: [statistics.median(col) for col in zip(*runs, strict=True)] for key, runs in times.items()}
    per_image = {key: statistics.median(sum(run) for run in runs) for key, runs in times.items()}
    rows = []
    for si in range(len(variants["folded"].steps)):
        f, u = floors["folded"][si], floors["unfolded"][si]
        cells = [f"step[{si}]", str(variants["folded"].steps[si]), str(variants["unfolded"].steps[si])]
        for backend in backends:
            a, b = p50[("folded", backend)][si], p50[("unfolded", backend)][si]
            cells += [ms(a), ms(b), ratio(b / a)]
        rows.append(cells + [ratio(u.flops / f.flops), ratio(u.ms / f.ms)])
    flops = {name: sum(f.flops for f in floors[name]) for name in names}
    floor_ms = {name: sum(f.ms for f in floors[name]) for name in names}
    total = ["**per image**", str(sum(variants["folded"].steps)), str(sum(variants["unfolded"].steps))]
    for backend in backends:
        a, b = per_image[("folded", backend)], per_image[("unfolded", backend)]
        total += [ms(a), ms(b), f"**{ratio(b / a)}**"]
    rows.append(total + [ratio(flops["unfolded"] / flops["folded"]), ratio(floor_ms["unfolded"] / floor_ms["folded"])])
    runs = len(times[("folded", "ort")])
    headers = ["step", "q folded", "q unfolded"]
    headers += [f"{b} {h}" for b in backends for h in ("folded ms", "unfolded ms", "unfolded / folded")]
    headers += ["FLOPs ratio", "floor ratio"]
    unfolded = variants["unfolded"].config.generator
    notes = [
        f"folded: {ctx.options.preset} ({variants['folded'].config.generator.positions} positions × 2 tokens); "
        f"unfolded: the same width {unfolded.width}, depth {unfolded.depth}, heads {unfolded.heads}, V "
        f"{unfolded.codebook_size}, one token per position, {unfolded.positions} positions, step q = 2·q_s; "
        "batch 1 (2 rows), p50 over "
        f"{runs} runs; per image = the {len(rows) - 1} steps (prefill, sampler, fold and decode cost the same in both)",
        "FLOPs ratio and floor ratio: what `bench/cost.py` and the calibration predict for unfolded ÷ folded",
    ]
    raw = {
        "steps": {name: v.steps for name, v in variants.items()},
        "step_ms_p50": {f"{n}/{b}": p50[(n, b)] for n in names for b in backends},
        "per_image_ms": {f"{n}/{b}": per_image[(n, b)] for n in names for b in backends},
        "floor_ms": {name: [f.ms for f in floors[name]] for name in names},
        "flops": flops,
        "runs": runs,
    }
    return JobResult("folding", "Folding: two tokens per position against one", raw, [table(headers, rows)], notes)


def _measure(ctx: Context, variants: dict[str, Variant], allot: float) -> dict[tuple[str, str], list[list[float]]]:
    """Rounds of (folded, unfolded) × (ort, torch), every step timed; the first round is a warm-up."""
    times: dict[tuple[str, str], list[list[float]]] = {(n, b): [] for n in variants for b in ("ort", "torch")}
    plan = Plan(allot, ctx.options.warmup, min_runs=1, max_runs=ctx.options.runs)
    start, rounds, done = time.perf_counter(), None, 0
    while rounds is None or done < rounds:
        round_start = time.perf_counter()
        for (name, backend), runs in times.items():
            time.sleep(PAUSE_S)
            steps = variants[name].runners[backend]()
            if done >= plan.warmup:
                runs.append(steps)
        done += 1
        if rounds is None:
            round_s = time.perf_counter() - round_start
            rounds = plan.warmup + plan.runs(round_s, time.perf_counter() - start)
            ctx.say(f"folding: {plan.warmup} warm-up + {rounds - plan.warmup} runs (a round takes {round_s:.1f} s)")
    return times
