"""The generation loop, written once against the backend protocol.

``generate`` validates the request, draws the sampling noise on the host and calls a session in
the order of ``backends/base.py``: prefill → for every scale: sample → fold → step (except after
the last scale) → decode. The optional ``StepProfiler`` times every stage.

Random stream: one ``np.random.default_rng(seed)`` per call; before sampling scale ``si`` (in scale
order) it draws ``rng.random((B, q_si, 2, V), dtype=float32)``, one value per vocabulary entry, uniform in [0, 1)
(the sampler clips it away from 0 and 1). The same seed, labels and bundle give the same noise on
every backend; the noise of one image depends on the batch it is generated in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from imagefolder.core.schedule import SamplingParams, check_labels, guidance, scale_spans
from imagefolder.errors import InputError
from imagefolder.runtime.backends.base import Backend, Session
from imagefolder.runtime.profiler import StepProfiler

BRANCHES = 2  # tokens per position; the noise of a scale is (B, q, 2, V) (backends/base.py)


@dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # (B, 3, H, W) float32 in [-1, 1]
    indices: np.ndarray  # (B, 2, P) int32


def generate(
    backend: Backend,
    labels,
    params: SamplingParams | None = None,
    profiler: StepProfiler | None = None,
    session: Session | None = None,
) -> GenerationResult:
    """Generate one image per label.

    Args:
        backend: any backend; its ``scales``, ``num_classes`` and ``codebook_size`` shape the request.
        labels: class ids, one per image.
        params: sampling parameters (default: ``SamplingParams()``, the official settings).
        profiler: records every stage of this call as one run.
        session: a session of this backend for ``len(labels)`` images to reuse (profiling); by
            default one is allocated and closed here.
    Returns:
        images (B, 3, H, W) float32 in [-1, 1] and the sampled indices (B, 2, P) int32.
    """
    params = params or SamplingParams()
    labels = check_labels(labels, backend.num_classes)
    batch = len(labels)
    if session is not None and session.batch != batch:
        raise InputError(f"the session holds {session.batch} images, the request {batch}")

    owned = session is None
    session = session or backend.session(batch)
    rng = np.random.default_rng(params.seed)
    spans = scale_spans(backend.scales)
    num_scales = len(spans)
    try:
        with profiler.run(batch, session.device_timer) if profiler else contextlib.nullcontext():
            stage = profiler.stage if profiler else _no_stage
            with stage("prefill"):
                session.prefill(labels)
            for si in range(num_scales):
                noise = rng.random((batch, spans[si][1], BRANCHES, backend.codebook_size), dtype=np.float32)
                weight = guidance(params.cfg, si, num_scales)
                with stage("sample", si):
                    session.sample(si, weight, params.top_k, params.top_p, noise)
                with stage("fold", si):
                    session.fold(si)
                if si < num_scales - 1:
                    with stage("step", si + 1):
                        session.step(si + 1)
            with stage("decode"):
                images = session.decode()
            indices = session.indices()
    finally:
        if owned:
            session.close()
    return GenerationResult(images=images, indices=indices)


def _no_stage(name: str, scale: int | None = None) -> contextlib.nullcontext:
    return contextlib.nullcontext()
