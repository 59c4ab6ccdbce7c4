"""The protocol every backend implements, so the generation loop is written once.

A backend turns a loaded bundle into sessions. A ``Session`` is allocated for one batch size and
owns all per-generation state in the backend's memory (the KV cache, the conditioning, the current
logits, f̂, the next folded input, the sampled tokens). ``Session.generate(request)`` takes every
per-image input of a generation at once (the labels, one uniform per token, the sampling parameters
of every scale), runs the scales on what the session holds, and returns only images and indices:
on a GPU, logits never cross to the host and the host sends a few KB per image. A request may teacher-force
any of its tokens (conditioned generation): the reference indices and the force mask go in with the rest,
and the sampler returns the reference token wherever the mask is set.

Inside ``generate`` the device work of one generation is a fixed sequence of stages, written once
here (``run_stages``) and used by every backend; a session that replays a CUDA graph captured that
same sequence::

    session.prefill()             # the request's inputs in, the per-image conditioning computed
    for si in range(num_scales):
        session.step(si)          # scale 0 starts from the conditioning's start token
        session.sample(si)
        if si < num_scales - 1:
            session.fold(si)      # this scale's tokens into f̂, and the next scale's input
    session.decode()              # indices → images, and both towards the host
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from imagefolder.core.bundle import Bundle


@dataclass(frozen=True)
class BatchRequest:
    """Everything a session needs for one generation of B images, as host arrays.

    Args:
        labels: (B,) int64 class ids (the session adds the null-class rows).
        uniforms: (B, P, branches) float32 in [0, 1): one per token (``core.sampler.image_uniforms``).
        guidance: (SN, B) float32: the CFG weight of every scale and image.
        top_k: (B,) int64; top_p: (B,) float32.
        reference: (B, branches, P) int32: each image's reference indices (zeros where it has none).
        force: (B, P, branches) bool: where the reference token replaces the draw (all False: unconditioned).
    """

    labels: np.ndarray
    uniforms: np.ndarray
    guidance: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    reference: np.ndarray
    force: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the request: what a session sends to its device per generation."""
        arrays = (self.labels, self.uniforms, self.guidance, self.top_k, self.top_p, self.reference, self.force)
        return sum(a.nbytes for a in arrays)

    def scale_block(self, start: int, q: int) -> tuple[np.ndarray, np.ndarray]:
        """The sampler's ``reference_tokens`` (B, q, branches) int32 and ``force_mask`` (B, q, branches) bool of
        the scale whose positions are ``start .. start + q``."""
        return self.reference[:, :, start : start + q].transpose(0, 2, 1), self.force[:, start : start + q]


class DeviceTimer(Protocol):
    """Device-side timing (CUDA events on the inference stream); backends without one return None."""

    def start(self, label: str) -> None: ...

    def stop(self, label: str) -> None: ...

    def collect(self) -> list[tuple[str, float]]:
        """Synchronise and return (label, milliseconds) for every start/stop pair since the last call."""
        ...


class Stage(Protocol):
    """Times one stage of a generation: ``with stage("step", si): ...`` (``StepProfiler.stage``)."""

    def __call__(self, name: str, scale: int | None = None) -> AbstractContextManager[None]: ...


def no_stage(name: str, scale: int | None = None) -> AbstractContextManager[None]:
    """The ``Stage`` that times nothing."""
    return contextlib.nullcontext()


class Stages(Protocol):
    """The device work of one generation, stage by stage, on what the session already holds."""

    def prefill(self) -> None:
        """Take in the request loaded by ``generate`` and compute the conditioning (CFG rows added here)."""
        ...

    def step(self, scale_index: int) -> None:
        """Run the generator on the input of ``scale_index`` and write its keys/values into the cache."""
        ...

    def sample(self, scale_index: int) -> None:
        """Sample this scale's tokens (B, q, branches) from the current logits."""
        ...

    def fold(self, scale_index: int) -> None:
        """Add this scale's tokens to f̂ and compute the next scale's folded input."""
        ...

    def decode(self) -> None:
        """Decode the sampled indices to images, and move images and indices to where ``generate`` reads them."""
        ...


def run_stages(session: Stages, num_scales: int, stage: Stage = no_stage) -> None:
    """One generation's stages in their order, each inside ``stage`` (the one copy of the loop's order)."""
    with stage("prefill"):
        session.prefill()
    for si in range(num_scales):
        with stage("step", si):
            session.step(si)
        with stage("sample", si):
            session.sample(si)
        if si < num_scales - 1:
            with stage("fold", si):
                session.fold(si)
    with stage("decode"):
        session.decode()


class Session(Protocol):
    batch: int

    @property
    def device_timer(self) -> DeviceTimer | None: ...

    @property
    def transferred(self) -> tuple[int, int]:
        """Bytes sent host → device and device → host since the session was made."""
        ...

    @property
    def launches(self) -> int | None:
        """Operations the host enqueued on the device for this session's generations; None where not counted."""
        ...

    def generate(self, request: BatchRequest, stage: Stage = no_stage) -> tuple[np.ndarray, np.ndarray]:
        """One generation of ``batch`` images (a session is reused across generations; each starts afresh).

        Returns:
            images (B, 3, H, W) float32 in [-1, 1] and indices (B, 2, P) int32, host arrays the
            session does not touch again.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class GraphSession(Protocol):
    """A session that can replay its whole generation as one CUDA graph (TensorRT; torch on CUDA).

    ``use_graph``: when true, the first generation after an eager one is captured (the graph is
    launched at once) and every later generation replays it: one launch per generation; when false,
    every generation runs eagerly, stage by stage. A capture that fails leaves the session eager.
    """

    use_graph: bool


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def scales(self) -> tuple[int, ...]:
        """The model's scales (the side of each scale's square token grid)."""
        ...

    @property
    def num_classes(self) -> int:
        """Class ids are in [0, num_classes); num_classes itself is the null class."""
        ...

    @property
    def candidates(self) -> int:
        """The sampler's TopK size: top_k above it acts as it."""
        ...

    @property
    def codebook_size(self) -> int:
        """V, codes per branch."""
        ...

    @property
    def image_size(self) -> int: ...

    @property
    def batch_max(self) -> int:
        """The largest session; the loop splits larger requests."""
        ...

    def session(self, batch: int) -> Session:
        """Allocate a session for ``batch`` images (at most the bundle's ``batch_max``)."""
        ...

    def encode(self, images: np.ndarray) -> np.ndarray:
        """images (B, 3, H, W) float32 in [-1, 1] → indices (B, 2, P) int32."""
        ...

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """indices (B, 2, P) int32 → images (B, 3, H, W) float32 in [-1, 1]."""
        ...

    def close(self) -> None: ...


class BundleFacts:
    """The model facts of ``Backend``, read from the ``bundle`` attribute (the ort and trt backends)."""

    bundle: Bundle

    @property
    def scales(self) -> tuple[int, ...]:
        return self.bundle.scales

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def candidates(self) -> int:
        return self.bundle.candidates

    @property
    def codebook_size(self) -> int:
        return self.bundle.codebook_size

    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    @property
    def batch_max(self) -> int:
        return self.bundle.batch_max
