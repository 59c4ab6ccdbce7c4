"""Training and evaluation data: procedural shapes, natural-image crops, and image folders.

Three map-style datasets, each returning ``(image, label)`` with the image a float tensor
(3, H, W) in [-1, 1] (the range the tokenizer expects) and the label an int:

- ``ShapesDataset``: an embedded class-conditional set of ten visually distinct classes, drawn on
  the fly and deterministic from ``(seed, index)``. Nothing is stored or downloaded, so the tests,
  the default model and its evaluation all run on a fresh install. Different seeds give disjoint
  draws, which is how the held-out split is made.
- ``NaturalCropsDataset``: random crops of the photographs that ship inside scikit-image
  (``skimage.data``) and, when installed, scikit-learn (``load_sample_images``), for reconstruction
  training and tests on natural statistics. Label is always 0.
- ``FolderDataset``: the usual ``root/<class>/*.png`` layout for users' own data.

``open_dataset`` maps the ``--data`` option of the commands to one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from imagefolder.core.images import load_images
from imagefolder.errors import InputError
from imagefolder.install import install_command

log = logging.getLogger(__name__)

SHAPE_CLASSES: tuple[str, ...] = (
    "disk",
    "square",
    "triangle",
    "plus",
    "ring",
    "h-stripes",
    "v-stripes",
    "checker",
    "frame",
    "x-cross",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered: anti-aliased edges
HELDOUT_SEED = 1_000_003  # the evaluation split of the shapes set


class DataError(InputError):
    """A dataset cannot be opened (empty folder, unknown name, missing optional package)."""


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float array in [0, 1] -> (3, H, W) float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# Procedural shapes
# ---------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _shape_mask(cls: int, x: np.ndarray, y: np.ndarray, r: float, period: float) -> np.ndarray:
    # x, y: centred coordinates in image units (shapes) or absolute ones (stripes); r: shape radius.
    ax, ay = np.abs(x), np.abs(y)
    arm = 0.3 * r  # half-width of the bars of plus, frame and x-cross
    if cls == 0:  # disk
        return x * x + y * y <= r * r
    if cls == 1:  # square
        return np.maximum(ax, ay) <= r * 0.85
    if cls == 2:  # upward triangle, centred on its bounding box
        return (y <= r * 0.8) & (y >= 1.9 * ax - r)
    if cls == 3:  # plus
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if cls == 4:  # ring
        d = np.sqrt(x * x + y * y)
        return (d <= r) & (d >= 0.6 * r)
    if cls == 5:  # horizontal stripes over the whole image
        return (y % period) < period / 2
    if cls == 6:  # vertical stripes
        return (x % period) < period / 2
    if cls == 7:  # checkerboard
        return ((x % period) < period / 2) ^ ((y % period) < period / 2)
    if cls == 8:  # hollow square
        m = np.maximum(ax, ay)
        return (m <= r * 0.85) & (m >= r * 0.85 - arm * 1.2)
    if cls == 9:  # diagonal cross
        return ((np.abs(x - y) <= arm * 1.2) | (np.abs(x + y) <= arm * 1.2)) & (np.maximum(ax, ay) <= r * 0.85)
    raise DataError(f"shape class must be in [0, {len(SHAPE_CLASSES)}), got {cls}")


def render_shape(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one image of class ``cls``: (size, size, 3) float32 in [0, 1].

    Colour, position, size, stripe period and background vary with ``rng``; the class is carried by
    the geometry alone (hue is uniform over all classes).
    """
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel units
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    r = size * rng.uniform(0.24, 0.36)
    margin = r * 0.9
    cx, cy = rng.uniform(margin, size - margin, 2)
    period = size / rng.uniform(3.0, 5.0)
    textured = cls in (5, 6, 7)
    x, y = (xx + rng.uniform(0, period), yy + rng.uniform(0, period)) if textured else (xx - cx, yy - cy)
    mask = _shape_mask(cls, x, y, r, period).astype(np.float32)
    mask = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]  # (size, size, 1)
    fg = _hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    bg = np.full(3, rng.uniform(0.0, 0.3)) + rng.uniform(-0.05, 0.05, 3)
    img = mask * fg + (1 - mask) * np.clip(bg, 0, 1)
    return img.astype(np.float32)


class ShapesDataset(Dataset):
    """Ten procedural shape classes, generated on the fly; item i is a pure function of (seed, i).

    Labels cycle through the classes (``label = i % 10``), so any contiguous range of indices is
    class-balanced.
    """

    num_classes = len(SHAPE_CLASSES)

    def __init__(self, image_size: int = 64, length: int = 1_000_000, seed: int = 0) -> None:
        self.image_size, self.length, self.seed = image_size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, index])
        return to_tensor(render_shape(label, rng, self.image_size)), label


# ---------------------------------------------------------------------------------------------
# Natural-image crops from the photographs bundled with scikit-image / scikit-learn
# ---------------------------------------------------------------------------------------------

# skimage.data images that ship inside the wheel (no pooch download), RGB photographs only.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def bundled_photos() -> list[np.ndarray]:
    """The RGB photographs available offline: list of (H, W, 3) uint8 arrays.

    Raises:
        DataError: neither scikit-image nor scikit-learn is installed.
    """
    photos: list[np.ndarray] = []
    try:
        import skimage.data

        for name in SKIMAGE_PHOTOS:
            try:
                photos.append(np.asarray(getattr(skimage.data, name)()))
            except Exception as err:  # a photo that would need a download: skip it
                log.debug("skimage.data.%s unavailable: %s", name, err)
    except ImportError:
        log.debug("scikit-image is not installed")
    try:
        from sklearn.datasets import load_sample_images

        photos.extend(np.asarray(img) for img in load_sample_images().images)
    except ImportError:
        log.debug("scikit-learn is not installed")
    photos = [p for p in photos if p.ndim == 3 and p.shape[2] == 3]
    if not photos:
        raise DataError(f"natural-image crops need scikit-image or scikit-learn: {install_command('train')}")
    return photos


class NaturalCropsDataset(Dataset):
    """Random square crops (side 96..min(H, W) pixels, resized to ``image_size``) of bundled photographs.

    Deterministic from (seed, index); ``holdout`` reserves the right-most 25% of every photograph,
    so training crops (left 75%) and held-out crops never overlap.
    """

    num_classes = 1

    def __init__(self, image_size: int = 64, length: int = 100_000, seed: int = 0, holdout: bool = False) -> None:
        self.image_size, self.length, self.seed, self.holdout = image_size, length, seed, holdout
        self.photos = bundled_photos()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index, int(self.holdout)])
        photo = self.photos[index % len(self.photos)]
        h, w = photo.shape[:2]
        split = int(w * 0.75)
        x0, x1 = (split, w) if self.holdout else (0, split)
        side = int(rng.integers(min(96, h, x1 - x0), min(h, x1 - x0) + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(x0, x1 - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        crop = crop.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        img = np.asarray(crop, dtype=np.float32) / 255.0
        if rng.uniform() < 0.5:
            img = img[:, ::-1]
        return to_tensor(img), 0


# ---------------------------------------------------------------------------------------------
# Users' image folders
# ---------------------------------------------------------------------------------------------


class FolderDataset(Dataset):
    """``root/<class name>/<image>``: classes are the sorted sub-folder names, labels their indices."""

    def __init__(self, root: str | Path, image_size: int = 64) -> None:
        self.root, self.image_size = Path(root), image_size
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise DataError(f"no images found under {self.root}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        # The runtime's reader: decoded fully, every mode (16-bit, palette, alpha) converted, EXIF honoured.
        return torch.from_numpy(load_images([path], self.image_size)[0]), label


# ---------------------------------------------------------------------------------------------
# Selection and batching
# ---------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., Dataset]] = {
    "shapes": lambda size, heldout: ShapesDataset(size, seed=HELDOUT_SEED if heldout else 0),
    "natural": lambda size, heldout: NaturalCropsDataset(size, holdout=heldout, seed=1 if heldout else 0),
}


def open_dataset(name: str, image_size: int, heldout: bool = False) -> Dataset:
    """``shapes``, ``natural``, or a path to an image folder; ``heldout`` picks the evaluation split.

    A folder has no separate split: pass a different folder for evaluation.
    """
    if name in DATASETS:
        return DATASETS[name](image_size, heldout)
    if Path(name).is_dir():
        return FolderDataset(name, image_size)
    raise DataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or an image folder path")


def collate(dataset: Dataset, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``indices`` into one batch: images (B, 3, H, W) and labels (B,) int64."""
    items = [dataset[int(i)] for i in indices]
    return torch.stack([img for img, _ in items]), torch.tensor([label for _, label in items], dtype=torch.long)
