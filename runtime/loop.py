"""The generation loop, written once against the backend protocol.

``generate`` validates a request (class ids, sampling parameters), splits it into batches of at
most the backend's ``batch_max`` images, and runs each batch through a session
(``Session.generate``: the stages of ``backends/base.py``, or one CUDA-graph launch). Batches of one
size share one session, so a long request captures its graph at the second batch and replays it
after, while a single batch never captures (it would never replay). The optional ``StepProfiler``
times every stage (or the whole launch) and records the bytes and launches each run cost.

Random stream: image ``i`` of a request seeded ``s`` draws its uniforms from
``core.sampler.image_uniforms(s, i, ...)``, one per token. They depend on nothing else: not on the
batch the image is generated in, nor on how the request was split, so a server that batches
requests together (``run_batch`` with ``ImageRequest``s of several requests) returns each request
what it would get alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imagefolder.core.sampler import TRT_TOPK_LIMIT, image_uniforms
from imagefolder.core.schedule import SamplingParams, check_labels, guidance, num_positions
from imagefolder.errors import InputError
from imagefolder.runtime.backends.base import Backend, BatchRequest, Session, no_stage
from imagefolder.runtime.profiler import StepProfiler

BRANCHES = 2  # tokens per position


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate: its class, its sampling parameters, and its place in its request.

    The image's uniforms are ``image_uniforms(params.seed, index, ...)``.
    """

    label: int
    params: SamplingParams
    index: int = 0


@dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # (B, 3, H, W) float32 in [-1, 1]
    indices: np.ndarray  # (B, 2, P) int32


def batch_request(images: list[ImageRequest], scales: tuple[int, ...]) -> BatchRequest:
    """The host arrays of one batch: labels, uniforms, per-scale guidance and the filters of every image."""
    positions, num_scales = num_positions(scales), len(scales)
    return BatchRequest(
        labels=np.array([image.label for image in images], dtype=np.int64),
        uniforms=np.stack([image_uniforms(im.params.seed, im.index, positions, BRANCHES) for im in images]),
        guidance=np.array(
            [[guidance(im.params.cfg, si, num_scales) for im in images] for si in range(num_scales)], dtype=np.float32
        ),
        top_k=np.array([image.params.top_k for image in images], dtype=np.int64),
        top_p=np.array([image.params.top_p for image in images], dtype=np.float32),
    )


def session_sizes(count: int, sizes: Sequence[int]) -> list[int]:
    """Session batch sizes that hold ``count`` images, in order: the largest size while it fills, then the
    smallest size that holds the rest (the caller pads it).

    For engines built for a few batch sizes (TensorRT profiles): one launch with at most size − 1 padded
    images costs less than several launches of smaller sessions. Since an image's tokens depend only on
    its own label, seed, index and settings, padding and packing change nothing in the images.
    """
    if count < 0 or not sizes or min(sizes) < 1:
        raise InputError(f"cannot pack {count} images into sessions of sizes {list(sizes)}")
    largest, out = max(sizes), []
    while count >= largest:
        out.append(largest)
        count -= largest
    if count:
        out.append(min(s for s in sizes if s >= count))
    return out


def run_batch(
    session: Session, scales: tuple[int, ...], images: list[ImageRequest], profiler: StepProfiler | None = None
) -> GenerationResult:
    """Generate ``images`` (exactly ``session.batch`` of them, labels already checked) on one session."""
    if len(images) != session.batch:
        raise InputError(f"the session holds {session.batch} images, the request {len(images)}")
    request = batch_request(images, scales)
    sent, received = session.transferred
    launches = session.launches
    with profiler.run(session.batch, session.device_timer) if profiler else contextlib.nullcontext() as run:
        images_out, indices = session.generate(request, profiler.stage if profiler else no_stage)
        if run is not None:
            now_sent, now_received = session.transferred
            run.bytes_to_device, run.bytes_from_device = now_sent - sent, now_received - received
            now_launches = session.launches
            run.launches = None if now_launches is None or launches is None else now_launches - launches
    return GenerationResult(images=images_out, indices=indices)


def check_top_k(top_k: int, backend: Backend) -> None:
    """Refuse a top-k the backend's sampler cannot honour: above its candidates, when they are fewer than the codebook.

    The sampler ranks only its ``candidates`` best logits (its TopK size, fixed at export); a top-k at or
    above the codebook keeps every code, which those candidates do when they are the whole codebook.
    """
    if top_k > backend.candidates and backend.candidates < backend.codebook_size:
        raise InputError(
            f"--top-k {top_k} is above the {backend.candidates} candidates this sampler ranks (of "
            f"{backend.codebook_size} codes): give --top-k {backend.candidates} or less, or re-export the bundle "
            f"with --candidates {min(top_k, backend.codebook_size, TRT_TOPK_LIMIT - 1)}"
        )


def generate(
    backend: Backend,
    labels,
    params: SamplingParams | None = None,
    profiler: StepProfiler | None = None,
    session: Session | None = None,
) -> GenerationResult:
    """Generate one image per label; requests above the backend's ``batch_max`` are split.

    Args:
        backend: any backend; its ``scales``, ``num_classes`` and ``batch_max`` shape the request.
        labels: class ids, one per image.
        params: sampling parameters (default: ``SamplingParams()``, the official settings).
        profiler: records every stage of each batch as one run.
        session: a session of this backend for exactly ``len(labels)`` images to reuse (profiling,
            servers); by default one session per batch size is allocated here, shared by the
            batches of that size, and closed at the end.
    Returns:
        images (B, 3, H, W) float32 in [-1, 1] and the sampled indices (B, 2, P) int32; image i
        is the same whatever the split.
    """
    params = params or SamplingParams()
    labels = check_labels(labels, backend.num_classes)
    check_top_k(params.top_k, backend)
    images = [ImageRequest(int(label), params, index) for index, label in enumerate(labels)]
    if session is not None:
        return run_batch(session, backend.scales, images, profiler)
    results = []
    sessions: dict[int, Session] = {}
    try:
        for start in range(0, len(images), backend.batch_max):
            part = images[start : start + backend.batch_max]
            if len(part) not in sessions:
                sessions[len(part)] = backend.session(len(part))
            results.append(run_batch(sessions[len(part)], backend.scales, part, profiler))
    finally:
        for owned in sessions.values():
            owned.close()
    return GenerationResult(
        images=np.concatenate([r.images for r in results]), indices=np.concatenate([r.indices for r in results])
    )
