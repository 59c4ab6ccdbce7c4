"""Image files in and out of the runtime's (B, 3, H, W) float32 [-1, 1] layout (Pillow, no torch)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from imagefolder.errors import ImageFileError


def load_images(paths: list[str | os.PathLike], size: int) -> np.ndarray:
    """Center-crop each image to a square, resize to ``size`` (Lanczos), scale to [-1, 1]."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
                out.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        except OSError as err:
            raise ImageFileError(f"cannot read image {path}: {err}") from err
    return np.stack(out)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] → (B, H, W, 3) uint8 (values outside are clipped)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {images.shape}")
    scaled = np.rint((np.clip(images, -1.0, 1.0) + 1.0) * 127.5)
    return scaled.astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (B, 3, H, W) images into one (rows·(H+pad)−pad, columns·(W+pad)−pad, 3) uint8 picture."""
    tiles = to_uint8(images)
    count, height, width, _ = tiles.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = -(-count // columns)
    out = np.zeros((rows * (height + pad) - pad, columns * (width + pad) - pad, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (height + pad) : r * (height + pad) + height, c * (width + pad) : c * (width + pad) + width] = tile
    return out


def psnr(reference: np.ndarray, test: np.ndarray) -> list[float]:
    """PSNR in dB per image, on the [0, 255] scale after uint8 rounding (what a saved PNG holds)."""
    a = to_uint8(reference).astype(np.float64)
    b = to_uint8(test).astype(np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return [float("inf") if m == 0 else 10 * math.log10(255.0**2 / m) for m in mse]


def write_png(path: str | os.PathLike, picture: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 picture as PNG atomically (temp file in the same folder, then rename)."""
    from imagefolder.io import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return path


def save_png(path: str | os.PathLike, images: np.ndarray) -> Path:
    """Save one image, (3, H, W) or (1, 3, H, W) in [-1, 1], as a PNG."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] != 1:
        raise ValueError(f"save_png takes one image; got {images.shape} (use save_grid for a batch)")
    return write_png(path, to_uint8(images)[0])


def save_grid(path: str | os.PathLike, images: np.ndarray, columns: int | None = None, pad: int = 2) -> Path:
    """Save a batch (B, 3, H, W) in [-1, 1] as one PNG grid (``columns`` default ⌈√B⌉)."""
    return write_png(path, grid(images, columns, pad))
