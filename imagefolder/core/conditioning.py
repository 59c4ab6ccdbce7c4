"""Conditioned generation: which of a reference image's tokens are teacher-forced, as a (P, branches) mask.

A conditioned image carries the reference's indices (branches, P), as the ``encoder`` graph gives them, and
a force mask (P, branches): where it is set the sampler returns the reference token instead of its draw, so
the fold, the KV cache and every later scale see the reference token, as the model saw teacher-forced tokens
in training. The masks a user asks for, and how they combine (``force_mask``):

- ``keep``: whole branches, by name (``BRANCH_NAMES``: 0 = detail, 1 = semantic): the paper's variations;
- ``keep_scales`` K: every token of the first K scales (the coarse layout kept, the details resampled);
- ``region``: a (side, side) boolean picture (True = keep the reference) mapped onto every scale's grid by
  area: a cell is kept when at least half of its area is kept (``KEPT_FRACTION``). A region keeps the
  branches ``keep`` names, both when ``keep`` is not given: in-painting, or out-painting when it keeps the
  centre.

force = (scale < K) ∪ (region × kept branches). No torch.
"""

from __future__ import annotations

import numpy as np

from imagefolder.core.schedule import scale_spans
from imagefolder.errors import InputError

BRANCH_NAMES = ("detail", "semantic")  # the encoder's branch order
KEPT_FRACTION = 0.5  # a scale-grid cell is kept when at least this fraction of its area is kept in the region


def check_reference_indices(indices, positions: int, codebook_size: int, branches: int = 2) -> np.ndarray:
    """Reference indices as (R, branches, P) int32 (a single (branches, P) reference gets R = 1).

    Raises ``InputError`` naming the problem: another shape, a non-integer dtype, a code outside the codebook.
    """
    array = np.asarray(indices)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (branches, positions) or array.shape[0] < 1:
        raise InputError(
            f"reference indices have shape {tuple(np.shape(indices))}; this model takes (B, {branches}, {positions}) "
            f"or ({branches}, {positions}), as `generate --indices` and `reconstruct --indices` write them"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"reference indices must be integers, got {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= codebook_size:
        raise InputError(
            f"reference indices range from {low} to {high}; this model's codebook holds 0..{codebook_size - 1}"
        )
    return array.astype(np.int32)


def branch_index(name: str) -> int:
    if name not in BRANCH_NAMES:
        raise InputError(f"unknown branch {name!r}; choose one of {', '.join(BRANCH_NAMES)}")
    return BRANCH_NAMES.index(name)


def cell_fractions(region: np.ndarray, cells: int) -> np.ndarray:
    """The kept fraction of each cell of a ``cells`` × ``cells`` grid laid over a square boolean ``region``.

    Exact for any side: pixel x covers [x, x+1), cell i covers [i·side/cells, (i+1)·side/cells), and each
    pixel counts with the length it shares with the cell.
    """
    side = region.shape[0]
    edges = np.arange(cells + 1) * side / cells
    pixels = np.arange(side)
    overlap = np.clip(np.minimum(pixels[None] + 1, edges[1:, None]) - np.maximum(pixels[None], edges[:-1, None]), 0, 1)
    weights = overlap / (side / cells)  # (cells, side): each row sums to 1
    return weights @ region.astype(np.float64) @ weights.T


def region_positions(region: np.ndarray, scales: tuple[int, ...] | list[int]) -> np.ndarray:
    """(P,) bool: the positions of every scale whose cell is at least ``KEPT_FRACTION`` kept in ``region``.

    Raises ``InputError`` when no cell is kept, or no cell generated, at any scale: such a mask forces
    nothing, or everything (use ``--keep-scales`` for that).
    """
    region = np.asarray(region, dtype=bool)
    if region.ndim != 2 or region.shape[0] != region.shape[1] or region.shape[0] < 1:
        raise InputError(f"a region must be a square picture, got shape {region.shape}")
    # exactly half counts as kept; 1e-9 absorbs the rounding of a cell edge that falls inside a pixel
    kept = np.concatenate([(cell_fractions(region, k) >= KEPT_FRACTION - 1e-9).reshape(-1) for k in scales])
    if not kept.any():
        raise InputError(
            f"the mask keeps no cell at any scale (a cell is kept when ≥ {KEPT_FRACTION:g} of its area is white); "
            "make the kept region larger or drop --invert-mask"
        )
    if kept.all():
        raise InputError(
            f"the mask generates no cell at any scale (a cell is generated when > {1 - KEPT_FRACTION:g} of its area "
            "is black); make the generated region larger, or use --keep-scales to keep everything"
        )
    return kept


def force_mask(
    scales: tuple[int, ...] | list[int],
    branches: int = 2,
    keep: str | None = None,
    keep_scales: int | None = None,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """(P, branches) bool: (the first ``keep_scales`` scales) ∪ (``region``'s positions × ``keep``'s branch).

    With neither ``keep`` nor ``region`` only the scales are kept; with neither of the three, the detail
    branch (the paper's variations). ``region`` is a (side, side) bool picture (``region_positions``).
    """
    spans = scale_spans(list(scales))
    total = spans[-1][0] + spans[-1][1]
    mask = np.zeros((total, branches), dtype=bool)
    if keep_scales is not None:
        if not 0 <= keep_scales <= len(spans):
            raise InputError(f"--keep-scales must be in [0, {len(spans)}] (the model's scales), got {keep_scales}")
        mask[: sum(q for _, q in spans[:keep_scales])] = True
    if keep is None and region is None and keep_scales is None:
        keep = BRANCH_NAMES[0]
    if keep is not None or region is not None:
        rows = np.ones(total, dtype=bool) if region is None else region_positions(region, scales)
        columns = np.ones(branches, dtype=bool) if keep is None else np.arange(branches) == branch_index(keep)
        mask |= rows[:, None] & columns[None]
    return mask
