"""The protocol every backend implements, so the generation loop is written once.

A backend turns a loaded bundle into sessions. A ``Session`` is allocated for one batch size and
owns all per-generation state in the backend's memory (the KV cache, the conditioning, the current
logits, f̂, the next folded input, the sampled tokens). Every per-image input of a generation goes
in once, at ``prefill``: the labels, one uniform per token, and the sampling parameters of every
scale. Then the scales run on what the session holds, and only indices and images come out: on a
GPU, logits never cross to the host and the host sends a few KB per image.

Order of calls for one generation (``runtime.loop``)::

    session.prefill(request)
    for si in range(num_scales):
        session.step(si)          # scale 0 starts from the conditioning's start token
        session.sample(si)
        if si < num_scales - 1:
            session.fold(si)      # this scale's tokens into f̂, and the next scale's input
    images = session.decode()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
    """

    labels: np.ndarray
    uniforms: np.ndarray
    guidance: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the request: what a session sends to its device per generation."""
        return sum(a.nbytes for a in (self.labels, self.uniforms, self.guidance, self.top_k, self.top_p))


class DeviceTimer(Protocol):
    """Device-side timing (CUDA events on the inference stream); backends without one return None."""

    def start(self, label: str) -> None: ...

    def stop(self, label: str) -> None: ...

    def collect(self) -> list[tuple[str, float]]:
        """Synchronise and return (label, milliseconds) for every start/stop pair since the last call."""
        ...


class Session(Protocol):
    batch: int

    @property
    def device_timer(self) -> DeviceTimer | None: ...

    @property
    def transferred(self) -> tuple[int, int]:
        """Bytes sent host → device and device → host since the session was made."""
        ...

    def prefill(self, request: BatchRequest) -> None:
        """Start a generation (a session is reused across generations: this resets its state).

        Takes every per-image input of the generation and computes the conditioning (CFG rows added here).
        """
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

    def decode(self) -> np.ndarray:
        """Decode the sampled indices to images (B, 3, H, W) float32 in [-1, 1] on the host."""
        ...

    def indices(self) -> np.ndarray:
        """The sampled indices (B, 2, P) int32 on the host."""
        ...

    def close(self) -> None: ...


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
