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

Conditioned generation: an ``ImageRequest`` may carry a ``Reference`` (the reference image's indices and
the force mask, ``core.conditioning``); its forced tokens are the reference's, and the rest are drawn from
the same uniforms as without it. Conditioned and unconditioned images share batches and sessions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from imagefolder.core.conditioning import check_reference_indices
from imagefolder.core.sampler import image_uniforms
from imagefolder.core.schedule import SamplingParams, check_labels, guidance, num_positions
from imagefolder.errors import InputError
from imagefolder.runtime.backends.base import Backend, BatchRequest, Session, Stage, no_stage
from imagefolder.runtime.profiler import StepProfiler

BRANCHES = 2  # tokens per position


@dataclass(frozen=True, eq=False)
class Reference:
    """What one image takes from a reference: its indices (branches, P) int32 and the force mask (P, branches)
    bool (``core.conditioning.force_mask``): the sampler returns ``indices[b, p]`` wherever ``mask[p, b]``."""

    indices: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate: its class, its sampling parameters, its place in its request, and the reference
    tokens it is conditioned on (None: unconditioned).

    The image's uniforms are ``image_uniforms(params.seed, index, ...)``.
    """

    label: int
    params: SamplingParams
    index: int = 0
    reference: Reference | None = None


@dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # (B, 3, H, W) float32 in [-1, 1]
    indices: np.ndarray  # (B, 2, P) int32


def batch_request(images: list[ImageRequest], scales: tuple[int, ...]) -> BatchRequest:
    """The host arrays of one batch: labels, uniforms, per-scale guidance, the filters and the references of every
    image (an unconditioned image: reference zeros, mask all False)."""
    positions, num_scales = num_positions(scales), len(scales)
    reference = np.zeros((len(images), BRANCHES, positions), np.int32)
    force = np.zeros((len(images), positions, BRANCHES), bool)
    for row, image in enumerate(images):
        if image.reference is not None:
            reference[row], force[row] = image.reference.indices, image.reference.mask
    return BatchRequest(
        labels=np.array([image.label for image in images], dtype=np.int64),
        uniforms=np.stack([image_uniforms(im.params.seed, im.index, positions, BRANCHES) for im in images]),
        guidance=np.array(
            [[guidance(im.params.cfg, si, num_scales) for im in images] for si in range(num_scales)], dtype=np.float32
        ),
        top_k=np.array([image.params.top_k for image in images], dtype=np.int64),
        top_p=np.array([image.params.top_p for image in images], dtype=np.float32),
        reference=reference,
        force=force,
    )


def _references(backend: Backend, count: int, reference, force) -> list[Reference | None]:
    """One ``Reference`` (or None) per image from ``generate``'s arguments, checked against the model."""
    if reference is None:
        if force is not None:
            raise InputError("a force mask needs the reference indices it forces")
        return [None] * count
    if force is None:
        raise InputError("a reference needs a force mask (core.conditioning.force_mask) saying which tokens it keeps")
    positions = num_positions(backend.scales)
    indices = check_reference_indices(reference, positions, backend.codebook_size, BRANCHES)
    mask = np.asarray(force)
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.ndim != 3 or mask.shape[1:] != (positions, BRANCHES) or mask.dtype != np.bool_:
        raise InputError(
            f"the force mask must be bool (P, 2) or (B, P, 2) with P = {positions}, got {mask.dtype} {np.shape(force)}"
        )
    for name, rows in (("reference indices", len(indices)), ("force masks", len(mask))):
        if rows not in (1, count):
            raise InputError(f"{rows} {name} for {count} images: give one for all or one per image")
    return [Reference(indices[i if len(indices) > 1 else 0], mask[i if len(mask) > 1 else 0]) for i in range(count)]


def _check_reference_images(backend: Backend, count: int, images) -> np.ndarray:
    """Reference images as the encoder's float32 input: (1 or ``count``, 3, H, H), else ``InputError``."""
    size = backend.image_size
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[0] not in (1, count) or array.shape[1:] != (3, size, size):
        raise InputError(
            f"reference images have shape {array.shape}; this model takes (1 or {count}, 3, {size}, {size}) "
            "(core.images.to_batch crops and resizes any picture to that)"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


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


@dataclass(frozen=True, eq=False)
class EncodeJob:
    """Reference images to encode inside a batch's run (the profiler's ``encode`` stage): ``images``
    (B, 3, H, H) float32 in [-1, 1] and ``masks`` (B, P, 2), one per image of the batch, encoded by ``backend``."""

    backend: Backend
    images: np.ndarray
    masks: np.ndarray

    def references(self, images: list[ImageRequest], stage: Stage) -> list[ImageRequest]:
        with stage("encode"):
            indices = self.backend.encode(self.images)
        return [replace(image, reference=Reference(indices[k], self.masks[k])) for k, image in enumerate(images)]


def run_batch(
    session: Session,
    scales: tuple[int, ...],
    images: list[ImageRequest],
    profiler: StepProfiler | None = None,
    encode: EncodeJob | None = None,
) -> GenerationResult:
    """Generate ``images`` (exactly ``session.batch`` of them, labels already checked) on one session.

    ``encode``: reference images encoded on the backend first, within the run (conditioned generation).
    """
    if len(images) != session.batch:
        raise InputError(f"the session holds {session.batch} images, the request {len(images)}")
    stage = profiler.stage if profiler else no_stage
    request = batch_request(images, scales) if encode is None else None
    sent, received = session.transferred
    launches = session.launches
    with profiler.run(session.batch, session.device_timer) if profiler else contextlib.nullcontext() as run:
        if request is None:
            assert encode is not None
            request = batch_request(encode.references(images, stage), scales)
        images_out, indices = session.generate(request, stage)
        if run is not None:
            now_sent, now_received = session.transferred
            run.bytes_to_device, run.bytes_from_device = now_sent - sent, now_received - received
            now_launches = session.launches
            run.launches = None if now_launches is None or launches is None else now_launches - launches
    return GenerationResult(images=images_out, indices=indices)


def generate(
    backend: Backend,
    labels,
    params: SamplingParams | None = None,
    profiler: StepProfiler | None = None,
    session: Session | None = None,
    reference=None,
    force=None,
    reference_images: np.ndarray | None = None,
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
        reference: conditioned generation: reference indices (2, P) for every image or (B, 2, P), one per
            image (``Backend.encode`` of the reference image, or indices saved by ``generate --indices``).
        force: the force mask (P, 2) for every image or (B, P, 2) (``core.conditioning.force_mask``): where
            set, the image's token is the reference's. Needs ``reference`` or ``reference_images``.
        reference_images: instead of ``reference``: images (1 or B, 3, H, H) float32 in [-1, 1]
            (``core.images.to_batch``), encoded on ``backend`` inside each batch's run (``encode`` stage).
    Returns:
        images (B, 3, H, W) float32 in [-1, 1] and the sampled indices (B, 2, P) int32; image i
        is the same whatever the split.
    """
    params = params or SamplingParams()
    labels = check_labels(labels, backend.num_classes)
    if reference_images is not None:
        if reference is not None:
            raise InputError("give reference indices or reference images, not both")
        reference_images = _check_reference_images(backend, len(labels), reference_images)
        reference = np.zeros((2, num_positions(backend.scales)), np.int32)  # a placeholder: encoded in the runs
    references = _references(backend, len(labels), reference, force)
    images = [ImageRequest(int(label), params, index, references[index]) for index, label in enumerate(labels)]

    def encode_job(start: int, count: int) -> EncodeJob | None:
        if reference_images is None:
            return None
        part = reference_images[start : start + count] if len(reference_images) > 1 else reference_images
        masks = np.stack([r.mask for r in references[start : start + count] if r is not None])
        return EncodeJob(backend, np.repeat(part, count // len(part), axis=0), masks)

    if session is not None:
        return run_batch(session, backend.scales, images, profiler, encode_job(0, len(images)))
    results = []
    sessions: dict[int, Session] = {}
    try:
        for start in range(0, len(images), backend.batch_max):
            part = images[start : start + backend.batch_max]
            if len(part) not in sessions:
                sessions[len(part)] = backend.session(len(part))
            results.append(run_batch(sessions[len(part)], backend.scales, part, profiler, encode_job(start, len(part))))
    finally:
        for owned in sessions.values():
            owned.close()
    return GenerationResult(
        images=np.concatenate([r.images for r in results]), indices=np.concatenate([r.indices for r in results])
    )
