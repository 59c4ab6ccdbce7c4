"""What the jobs of one run share: options, budget, models, bundles, backends, the calibration, measurements.

Everything expensive is made once and kept: a job that needs the d17 fp32 bundle, the calibration or
the batch-1 measurement of torch and ort gets the one an earlier job made (``--only batch`` alone
measures what ``roofline`` would otherwise have measured for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import bundles, calibrate, cost
from bench.budget import Budget
from bench.timing import Measured, Plan, TimedOrtBackend, TimedTorchBackend, measure
from imagefolder.core.bundle import Bundle
from imagefolder.core.sampler import default_candidates

BATCHES = (1, 2, 4, 8)
CALIBRATION_MIN_S = 0.05  # per GEMM shape for a 20-minute budget; shorter budgets scale it down
DRIFT_GEMM_FLOPS = 2e9  # the largest product re-timed for the drift: ≈ 10–40 ms on two cores


@dataclass
class Options:
    preset: str
    runs: int  # the most measured runs of any measurement
    warmup: int
    threads: int  # for torch (matmul calibration and the torch backend); ONNX Runtime's default count
    ort_threads: int | None  # ONNX Runtime's intra-op threads; None: its default
    workdir: Path
    quality_images: int  # images per dtype for the default model's class accuracy
    pruning_images: int = 1000  # images per variant for the pruning job's quality on the default model
    bundles: list[Path] = field(default_factory=list)  # the compare job's bundles (--bundles)
    pruning_ratios: tuple[float, ...] = (0.75, 0.5, 0.25)  # the pruning job's shares kept of the last two scales
    pruning_speed_ratios: tuple[float, ...] = ()  # those measured for speed on the preset (): the same
    pruning_combined: float | None = 0.0  # pruned on top of int8 compute; 0: the largest speed ratio; None: none
    serve_models: tuple[str, ...] = ()  # the serve job's models; () for the default model and the preset


@dataclass
class Calibration:
    threads: int
    memory_gbs: float
    gemm_gflops: dict  # (batch, m, k, n) -> GFLOP/s
    contention: dict  # (batch, m, k, n) -> GFLOP/s on `threads` threads ÷ on one
    min_s: float  # the least time each shape was timed for
    seconds: float


@dataclass
class Context:
    options: Options
    budget: Budget
    calibration: Calibration | None = None
    prepared: dict[str, Any] = field(default_factory=dict)  # what a job's prepare() made for its run()
    _models: dict[str, bundles.Models] = field(default_factory=dict)
    _bundles: dict[tuple, Bundle] = field(default_factory=dict)
    _ort: dict[tuple, TimedOrtBackend] = field(default_factory=dict)
    _torch: dict[str, TimedTorchBackend] = field(default_factory=dict)
    _measured: dict[int, dict[str, Measured]] = field(default_factory=dict)

    def say(self, message: str) -> None:
        self.budget.say(message)

    # -- models, bundles, backends ------------------------------------------------------------------

    def models(self, name: str | None = None) -> bundles.Models:
        name = name or self.options.preset
        if name not in self._models:
            self.say(f"building the {name} models" + ("" if name == bundles.DEFAULT_MODEL else " (random weights)"))
            self._models[name] = bundles.load_models(name)
        return self._models[name]

    def bundle(
        self, name: str | None = None, dtype: str = "fp32", weights: str | None = None, **options: Any
    ) -> Bundle:
        """``options``: further export options that change the graphs (``compute``, ``prune``)."""
        key = (name or self.options.preset, dtype, weights, repr(sorted(options.items())))
        if key not in self._bundles:
            self._bundles[key] = bundles.bundle(
                self.options.workdir, self.models(key[0]), dtype, weights, self.say, **options
            )
        return self._bundles[key]

    def ort(
        self, name: str | None = None, dtype: str = "fp32", weights: str | None = None, **options: Any
    ) -> TimedOrtBackend:
        key = (name or self.options.preset, dtype, weights, repr(sorted(options.items())))
        if key not in self._ort:
            bundle = self.bundle(name, dtype, weights, **options)
            self._ort[key] = TimedOrtBackend(bundle, threads=self.options.ort_threads)
        return self._ort[key]

    def release(self, name: str | None = None, dtype: str = "fp32", weights: str | None = None, **options: Any) -> None:
        """Drop the ort backend of a bundle (its sessions hold the model's weights in memory)."""
        key = (name or self.options.preset, dtype, weights, repr(sorted(options.items())))
        backend = self._ort.pop(key, None)
        if backend is not None:
            backend.close()

    def torch(self, name: str | None = None) -> TimedTorchBackend:
        name = name or self.options.preset
        if name not in self._torch:
            models = self.models(name)
            candidates = default_candidates(models.config.generator.codebook_size)
            self._torch[name] = TimedTorchBackend(models.tokenizer, models.generator, candidates)
        return self._torch[name]

    # -- calibration and measurements ---------------------------------------------------------------

    def calibrated(self) -> Calibration:
        """The calibration of this run (made now if no job made it yet)."""
        if self.calibration is None:
            config = self.models().config
            candidates = default_candidates(config.generator.codebook_size)
            shapes = calibrate.shapes_of(cost.generation_costs(config, b, candidates) for b in BATCHES)
            threads = self.options.threads
            min_s = min(max(CALIBRATION_MIN_S * self.budget.total_s / 1200, 0.001), CALIBRATION_MIN_S)
            self.say(f"calibrating: memory read GB/s and {len(shapes)} GEMM shapes on {threads} thread(s)")
            start = self.budget.elapsed_s
            memory = calibrate.memory_read_gbs(threads)

            def progress(done: int, total: int) -> None:
                if done == total or done % max(total // 4, 1) == 0:
                    self.say(f"calibrating: {done}/{total} GEMM shapes")

            rates = calibrate.gemm_gflops(shapes, threads, min_s, progress)
            steps = [cost.step_cost(config, 1, pn * pn) for pn in config.generator.scales]
            probes = list(dict.fromkeys(steps[i].gemms[3].shape for i in (0, len(steps) // 2, -1)))  # fc1
            contention = {}
            if threads > 1:
                self.say(f"calibrating: {threads} threads against 1 on {len(probes)} shapes (contention)")
                contention = calibrate.contention(probes, threads, min_s)
            elapsed = self.budget.elapsed_s - start
            self.calibration = Calibration(threads, memory, rates, contention, min_s, elapsed)
        return self.calibration

    def floors(self, batch: int) -> dict[str, calibrate.StageFloor]:
        """The floor of every stage of a generation of ``batch`` images of the preset, fp32."""
        config = self.models().config
        calib = self.calibrated()
        candidates = default_candidates(config.generator.codebook_size)
        return calibrate.floors(cost.generation_costs(config, batch, candidates), calib.gemm_gflops, calib.memory_gbs)

    def measured(self, batch: int, allot_s: float) -> dict[str, Measured]:
        """torch and ort, interleaved, on the preset at ``batch`` (measured once per run)."""
        if batch not in self._measured:
            torch.set_num_threads(self.options.threads)
            backends = {"torch": self.torch(), "ort": self.ort()}
            plan = Plan(allot_s, self.options.warmup, min_runs=1, max_runs=self.options.runs)
            self._measured[batch] = measure(backends, batch, plan, self.say)
        return self._measured[batch]

    def has_measured(self, batch: int) -> bool:
        return batch in self._measured

    def drift(self) -> dict:
        """The floor re-measured now ÷ at the calibration: memory rate and one GEMM shape's rate."""
        calib = self.calibrated()
        self.say("re-measuring the floor (drift over the run)")
        shape = max(
            (s for s in calib.gemm_gflops if 2 * s[0] * s[1] * s[2] * s[3] <= DRIFT_GEMM_FLOPS),
            key=lambda s: s[0] * s[1] * s[2] * s[3],
        )
        memory = calibrate.memory_read_gbs(calib.threads)
        gemm = calibrate.gemm_gflops([shape], calib.threads, calib.min_s)[shape]
        return {"memory": memory / calib.memory_gbs, "gemm": gemm / calib.gemm_gflops[shape], "gemm_shape": list(shape)}
