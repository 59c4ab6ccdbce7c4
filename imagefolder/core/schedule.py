"""The generation schedule: scales and their positions, the guidance ramp, the CFG rows, the sampling parameters.

Every backend, the export, the Triton model and the official PyTorch reference take these facts
from here; nothing else spells them out. Notation: SN scales, scale ``si`` is a ``pn × pn`` grid of
positions, P = Σ pn² positions per branch, B images and N = 2B rows under classifier-free guidance
(the B conditional rows first, then B rows of the null class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from imagefolder.errors import InputError

SEED_MAX = 2**63 - 1  # seeds travel as int64 (Triton, numpy) and seed torch.Generator


def scale_spans(scales: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """(first position, count) of every scale in the concatenated sequence of P positions."""
    spans, start = [], 0
    for pn in scales:
        spans.append((start, pn * pn))
        start += pn * pn
    return spans


def num_positions(scales: tuple[int, ...] | list[int]) -> int:
    """P: positions per branch over all scales."""
    return sum(pn * pn for pn in scales)


def positions(scales: tuple[int, ...] | list[int], scale_index: int) -> np.ndarray:
    """The global positions (int64) of one scale."""
    start, count = scale_spans(scales)[scale_index]
    return np.arange(start, start + count, dtype=np.int64)


def guidance(cfg: float, scale_index: int, num_scales: int) -> float:
    """The CFG weight t of one scale: linear from 0 at the first scale to ``cfg`` at the last.

    A single-scale model has no ramp: its one scale gets the full ``cfg``.
    """
    if num_scales < 2:
        return float(cfg)
    return float(cfg) * scale_index / (num_scales - 1)


def cfg_rows(labels: np.ndarray, null_class: int) -> np.ndarray:
    """(B,) class ids → the (2B,) rows of a CFG batch: the labels, then the null class."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.concatenate([labels, np.full_like(labels, null_class)])


def check_labels(labels, num_classes: int) -> np.ndarray:
    """Class ids as a (B,) int64 array, each in [0, num_classes); refuses anything else with its value."""
    if isinstance(labels, np.ndarray) and labels.ndim != 1:
        raise InputError(f"class ids must be a 1-D list, got an array of shape {labels.shape}")
    values = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    if not values or not all(_is_int(x) for x in values):
        raise InputError(f"class ids must be a non-empty list of integers, got {values!r}")
    bad = [int(x) for x in values if not 0 <= int(x) < num_classes]  # Python ints: no overflow, however large
    if bad:
        raise InputError(f"class id(s) {bad} outside [0, {num_classes}) for this model")
    return np.asarray(values, dtype=np.int64)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn; the defaults are the official evaluation settings.

    Args:
        cfg: classifier-free guidance at the last scale (finite, ≥ 0); scale si uses ``guidance(cfg, si, SN)``.
        top_k: candidates kept per branch by rank (≥ 1; values above the bundle's sampler candidates act as it).
        top_p: nucleus mass in (0, 1]; 1 disables it.
        seed: seed of the random stream, in [0, 2⁶³).
    """

    cfg: float = 3.25
    top_k: int = 750
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.cfg, int | float) and math.isfinite(self.cfg) and self.cfg >= 0):
            raise InputError(f"cfg must be a finite number ≥ 0, got {self.cfg}")
        if not _is_int(self.top_k) or self.top_k < 1:
            raise InputError(f"top_k must be an integer ≥ 1, got {self.top_k}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            raise InputError(f"seed must be an integer in [0, 2^63), got {self.seed}")


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
