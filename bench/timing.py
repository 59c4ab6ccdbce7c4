"""Interleaved measurement of whole generations, with the time spent inside the graphs.

Every backend of a measurement runs one generation per round, in turn (torch, ort, torch, ort, ...),
on one session each, so the drift of a shared machine hits all alike; a short pause before each
generation lets the other library's worker threads stop spinning first. The profiler
(``runtime.profiler.StepProfiler``) times every stage; a ``GraphClock`` adds the time spent inside
the graphs themselves (ONNX Runtime's ``run`` calls; the PyTorch models' methods), so that the
runtime's own overhead is end to end minus the graphs.

Round counts are planned, not fixed: the first round is timed and the measured rounds fill the time
allotted (between ``min_runs`` and ``max_runs``). Run r uses seed r, so runs differ in their tokens
but not in their work, and two backends or bundles can be compared token by token, run by run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from imagefolder.core.bundle import Bundle
from imagefolder.core.schedule import SamplingParams
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.backends.torch_backend import TorchBackend
from imagefolder.runtime.loop import generate
from imagefolder.runtime.profiler import StepProfiler

PAUSE_S = 0.2  # before each generation: ONNX Runtime's spinning threads and OpenMP's wait policy settle


class GraphClock:
    """Accumulates the wall time of the calls it wraps."""

    def __init__(self) -> None:
        self.ns = 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns += time.perf_counter_ns() - start

        return timed

    def take_ms(self) -> float:
        """The time accumulated since the last call, in ms."""
        ms, self.ns = self.ns / 1e6, 0
        return ms


class _TimedGraph:
    """An ``onnxruntime.InferenceSession`` whose runs are timed; everything else passes through."""

    def __init__(self, session, clock: GraphClock):
        self._session, self._clock = session, clock
        self.run = clock.wrap(session.run)
        self.run_with_iobinding = clock.wrap(session.run_with_iobinding)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class TimedOrtBackend(OrtBackend):
    """The ort backend, unchanged, with the time inside its graph sessions on ``clock``."""

    def __init__(self, bundle: Bundle, **options):
        super().__init__(bundle, **options)
        self.clock = GraphClock()
        self._timed: dict[str, _TimedGraph] = {}

    def graph(self, name: str):
        if name not in self._timed:
            self._timed[name] = _TimedGraph(super().graph(name), self.clock)
        return self._timed[name]

    def instrumented(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def open_graph(self, path: Path) -> ort.InferenceSession:
        """An ONNX file outside the bundle, in a session with exactly this backend's options and providers."""
        return ort.InferenceSession(str(path), sess_options=self._options, providers=self.providers)


class TimedTorchBackend(TorchBackend):
    """The torch backend; inside ``instrumented()`` the model methods it calls (the counterparts of the
    graphs) run on ``clock``. Only then: the models are the caller's, and an export deep-copies them."""

    def __init__(self, tokenizer, generator, candidates: int):
        super().__init__(tokenizer, generator, candidates)
        self.clock = GraphClock()

    @contextlib.contextmanager
    def instrumented(self) -> Iterator[None]:
        gen, tok = self.generator, self.tokenizer
        methods = [(gen, "prefill"), (gen, "step"), (tok, "embed_scale"), (tok, "next_scale_input")]
        methods.append((tok, "indices_to_img"))
        sampler = self.sampler
        try:
            for owner, method in methods:
                setattr(owner, method, self.clock.wrap(getattr(owner, method)))
            self.sampler = self.clock.wrap(sampler)
            yield
        finally:
            for owner, method in methods:
                owner.__dict__.pop(method, None)
            self.sampler = sampler


@dataclass
class Measured:
    """One backend's measured runs at one batch size."""

    report: dict  # StepProfiler.report()
    e2e_ms: list[float] = field(default_factory=list)  # per run
    stages_ms: list[float] = field(default_factory=list)  # per run: the sum of its stages
    graphs_ms: list[float] = field(default_factory=list)  # per run: the time inside the graphs
    indices: list[np.ndarray] = field(default_factory=list)  # per run (B, 2, P)


@dataclass
class Plan:
    """How many runs to measure: as many as fit ``allot_s`` after the first round, within bounds."""

    allot_s: float
    warmup: int = 1
    min_runs: int = 1
    max_runs: int = 10

    def runs(self, round_s: float, spent_s: float) -> int:
        fits = int(max(self.allot_s - spent_s, 0.0) / max(round_s, 1e-6))
        return max(self.min_runs, min(self.max_runs, fits))


def measure(backends: dict, batch: int, plan: Plan, say: Callable[[str], None]) -> dict[str, Measured]:
    """Interleaved generations of ``batch`` images on every backend, official sampling settings (run r
    seeded r); see the module docstring."""
    first = next(iter(backends.values()))
    labels = [i % first.num_classes for i in range(batch)]
    profilers = {name: StepProfiler(warmup=plan.warmup) for name in backends}
    runs: dict[str, Measured] = {name: Measured(report={}) for name in backends}
    start = time.perf_counter()
    rounds, done = None, 0
    with contextlib.ExitStack() as stack:
        sessions = {name: stack.enter_context(contextlib.closing(b.session(batch))) for name, b in backends.items()}
        for backend in backends.values():
            stack.enter_context(backend.instrumented())
        while rounds is None or done < rounds:
            round_start = time.perf_counter()
            seed = max(done - plan.warmup, 0)
            for name, backend in backends.items():
                time.sleep(PAUSE_S)
                backend.clock.take_ms()
                profiler = profilers[name]
                result = generate(backend, labels, SamplingParams(seed=seed), profiler=profiler, session=sessions[name])
                graphs_ms = backend.clock.take_ms()
                record = profiler.runs[-1]
                if not record.warmup:
                    runs[name].e2e_ms.append(record.wall_ns / 1e6)
                    runs[name].stages_ms.append(sum(s.host_ns for s in record.stages) / 1e6)
                    runs[name].graphs_ms.append(graphs_ms)
                    runs[name].indices.append(result.indices)
            done += 1
            if rounds is None:  # the first round (a warm-up, or the first run) sets the plan
                round_s = time.perf_counter() - round_start
                measured_runs = plan.runs(round_s, time.perf_counter() - start)
                rounds = plan.warmup + measured_runs
                say(
                    f"batch {batch}: {plan.warmup} warm-up + {measured_runs} runs of {' + '.join(backends)} "
                    f"(a round takes {round_s:.1f} s; {plan.allot_s:.0f} s allotted)"
                )
            elif done > plan.warmup:
                say(f"batch {batch}: run {done - plan.warmup}/{rounds - plan.warmup}")
    for name, measured in runs.items():
        measured.report = profilers[name].report()
    return runs


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The fraction of equal tokens between two lists of index arrays (run by run)."""
    equal = sum(int(np.sum(x == y)) for x, y in zip(a, b, strict=True))
    return equal / sum(x.size for x in a)
