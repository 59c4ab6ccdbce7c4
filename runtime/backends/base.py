"""The protocol every backend implements, so the generation loop is written once.

A backend turns a loaded bundle into sessions. A ``Session`` is allocated for one batch size and
owns all per-generation state in the backend's memory (the KV cache, the conditioning, the current
logits, f̂, the next folded input, the sampled tokens). The loop only passes small host values
(labels, sampling parameters, uniform noise) in and takes images and indices out, so on the GPU
logits never cross to the host.

Order of calls for one generation (``runtime.loop.generate``)::

    session.prefill(labels)
    for si in range(num_scales):
        session.sample(si, guidance, top_k, top_p, noise)
        session.fold(si)
        if si < num_scales - 1:
            session.step(si + 1)
    image = session.decode()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from imagefolder.core.bundle import Bundle


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

    def prefill(self, labels: np.ndarray) -> None:
        """Start a generation (a session is reused across generations: this resets its state).

        labels (B,) int64 → scale-0 logits, cache entries of scale 0, conditioning (CFG rows added here).
        """
        ...

    def sample(self, scale_index: int, guidance: float, top_k: int, top_p: float, noise: np.ndarray) -> None:
        """Sample this scale's tokens (B, q, 2) from the current logits with uniform ``noise`` (B, q, 2, V)."""
        ...

    def fold(self, scale_index: int) -> None:
        """Add this scale's tokens to f̂ and compute the next scale's folded input."""
        ...

    def step(self, scale_index: int) -> None:
        """Run the generator on the folded input of ``scale_index`` (≥ 1) and append its keys/values to the cache."""
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
