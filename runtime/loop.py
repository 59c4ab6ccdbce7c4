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

from imagefolder.errors import InputError
from imagefolder.export.specs import scale_positions
from imagefolder.runtime.backends.base import Backend, Session
from imagefolder.runtime.profiler import StepProfiler
from imagefolder.runtime.sampler import guidance_for

BRANCHES = 2  # tokens per position; the noise of a scale is (B, q, 2, V) (backends/base.py)


class GenerationError(InputError):
    """A generation request with invalid labels or parameters."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters.

    Args:
        cfg: classifier-free guidance at the last scale; scale si uses cfg·si/(SN−1).
        top_k: candidates kept per branch by rank (values above the bundle's candidates act as it).
        top_p: nucleus mass in (0, 1]; 1 disables it.
        seed: seed of the noise stream.
    """

    cfg: float = 3.25
    top_k: int = 750
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.cfg >= 0:
            raise GenerationError(f"cfg must be ≥ 0, got {self.cfg}")
        if int(self.top_k) != self.top_k or self.top_k < 1:
            raise GenerationError(f"top_k must be an integer ≥ 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise GenerationError(f"seed must be an integer ≥ 0, got {self.seed}")


@dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # (B, 3, H, W) float32 in [-1, 1]
    indices: np.ndarray  # (B, 2, P) int32


def check_labels(labels, num_classes: int) -> np.ndarray:
    """Labels as a (B,) int64 array, each in [0, num_classes)."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise GenerationError(f"labels must be a non-empty 1-D sequence of integers, got {labels!r}")
    bad = [int(x) for x in array if not 0 <= x < num_classes]
    if bad:
        raise GenerationError(f"class id(s) {bad} outside [0, {num_classes}) for this model")
    return array.astype(np.int64)


def generate(
    backend: Backend,
    labels,
    params: GenerationParams | None = None,
    profiler: StepProfiler | None = None,
    session: Session | None = None,
) -> GenerationResult:
    """Generate one image per label.

    Args:
        backend: any backend; its ``scales``, ``num_classes`` and ``codebook_size`` shape the request.
        labels: class ids, one per image.
        params: sampling parameters (defaults: ``GenerationParams()``).
        profiler: records every stage of this call as one run.
        session: a session of this backend for ``len(labels)`` images to reuse (profiling); by
            default one is allocated and closed here.
    Returns:
        images (B, 3, H, W) float32 in [-1, 1] and the sampled indices (B, 2, P) int32.
    """
    params = params or GenerationParams()
    labels = check_labels(labels, backend.num_classes)
    batch = len(labels)
    if session is not None and session.batch != batch:
        raise GenerationError(f"the session holds {session.batch} images, the request {batch}")

    owned = session is None
    session = session or backend.session(batch)
    rng = np.random.default_rng(params.seed)
    spans = scale_positions(backend.scales)
    num_scales = len(spans)
    try:
        with profiler.run(batch, session.device_timer) if profiler else contextlib.nullcontext():
            stage = profiler.stage if profiler else _no_stage
            with stage("prefill"):
                session.prefill(labels)
            for si in range(num_scales):
                noise = rng.random((batch, spans[si][1], BRANCHES, backend.codebook_size), dtype=np.float32)
                guidance = guidance_for(params.cfg, si, num_scales)
                with stage("sample", si):
                    session.sample(si, guidance, params.top_k, params.top_p, noise)
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
