"""The options of conditioned generation (``generate`` and ``profile``): a reference and what of it is kept.

Files are read and options checked before a backend loads (``ReferenceOptions.read``), so bad input costs
one line and no model load; the mask is built once the backend says the model's scales (``resolve``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from imagefolder.core.conditioning import BRANCH_NAMES, KEPT_FRACTION
from imagefolder.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from imagefolder.runtime.backends.base import Backend

MASK_RULE = (
    f"A scale-grid cell is kept when at least {KEPT_FRACTION:g} of its area is white "
    "(the mask is centre-cropped to a square like the reference, then every scale's grid is laid over it)."
)

OPTIONS = [
    click.option(
        "--reference",
        "reference_image",
        type=click.Path(path_type=Path),
        help="Condition on this image: encoded by the bundle's encoder on the same backend (centre-cropped "
        "and resized like `reconstruct`'s inputs); its kept tokens are teacher-forced.",
    ),
    click.option(
        "--reference-indices",
        type=click.Path(path_type=Path),
        help="Condition on indices (.npy, (2, P) or (B, 2, P)) written by `generate --indices` or "
        "`reconstruct --indices`.",
    ),
    click.option(
        "--keep",
        type=click.Choice(BRANCH_NAMES),
        help="Keep one branch of the reference (variations); with --mask, the branch kept inside the mask. "
        "Default with a reference and no --keep-scales or --mask: detail.",
    ),
    click.option(
        "--keep-scales",
        type=click.IntRange(0),
        help="Keep every token of the first K scales (coarse layout kept, details resampled).",
    ),
    click.option(
        "--mask",
        "mask_image",
        type=click.Path(path_type=Path),
        help="Keep the reference where this picture is white, generate where black (in-painting; a white "
        f"centre: out-painting). {MASK_RULE}",
    ),
    click.option("--invert-mask", is_flag=True, help="Swap the mask: keep where black, generate where white."),
]


def reference_options(command):
    """Add the conditioning options to a click command (they arrive as its keyword arguments)."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command


@dataclass
class ReferenceOptions:
    """What the conditioning options asked for, with the files already read and checked."""

    picture: Image.Image | None
    indices: np.ndarray | None
    keep: str | None
    keep_scales: int | None
    region: np.ndarray | None

    @classmethod
    def read(
        cls,
        reference_image: Path | None,
        reference_indices: Path | None,
        keep: str | None,
        keep_scales: int | None,
        mask_image: Path | None,
        invert_mask: bool,
    ) -> ReferenceOptions | None:
        """Check the combination and read the files; None when the command is unconditioned."""
        if reference_image is not None and reference_indices is not None:
            raise InputError("give --reference IMG or --reference-indices FILE, not both")
        if reference_image is None and reference_indices is None:
            for name, given in (
                ("--keep", keep),
                ("--keep-scales", keep_scales),
                ("--mask", mask_image),
                ("--invert-mask", invert_mask or None),
            ):
                if given is not None:
                    raise InputError(f"{name} needs a reference: give --reference IMG or --reference-indices FILE")
            return None
        if invert_mask and mask_image is None:
            raise InputError("--invert-mask needs --mask")
        from imagefolder.core.images import read_image, read_mask

        picture = read_image(reference_image) if reference_image is not None else None
        indices = _read_indices(reference_indices) if reference_indices is not None else None
        region = None
        if mask_image is not None:
            region = read_mask(mask_image)
            region = ~region if invert_mask else region
        return cls(picture, indices, keep, keep_scales, region)

    def force(self, scales: tuple[int, ...]) -> np.ndarray:
        from imagefolder.core.conditioning import force_mask

        return force_mask(scales, keep=self.keep, keep_scales=self.keep_scales, region=self.region)

    def reference_images(self, engine: Backend) -> np.ndarray | None:
        """The reference picture as the encoder's (1, 3, H, H) input, or None for indices."""
        if self.picture is None:
            return None
        from imagefolder.core.images import to_batch

        return to_batch([self.picture], engine.image_size)


def _read_indices(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as file:
            return np.load(file, allow_pickle=False)
    except OSError as err:
        raise InputError(f"cannot read the reference indices {path}: {err.strerror or err}") from err
    except (ValueError, EOFError) as err:
        raise InputError(f"{path} is not a .npy array of indices ({err}); write one with `generate --indices`") from err
