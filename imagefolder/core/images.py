"""Image files in and out of the runtime's (B, 3, H, W) float32 [-1, 1] layout (Pillow, no torch).

Reading a user's image is where untrusted bytes meet the runtime, so every file is checked before a
pixel is used: it must be readable, be an image, be no larger than ``MAX_PIXELS`` (checked from the
header, before anything is decoded), and decode completely. A truncated file is refused, not padded
with grey: this relies on Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` keeping its default, False,
which nothing in imagefolder changes. Every failure is one ``ImageFileError`` that names the file,
what is wrong and what to do.

Every pixel mode is converted by its meaning, not by Pillow's 8-bit shortcuts (which clip 16-bit
grey to white): 8-bit modes (1, L, P, RGB, CMYK, YCbCr, LAB, HSV and their alpha variants) through
Pillow's conversions to RGB; 16-bit grey (``I;16*``, and ``I`` holding 0..65535) scaled by 65535;
float grey ``F`` read as [0, 1] (values outside a mode's range are refused, never clipped). Alpha is
composited onto ``BACKGROUND`` before any resampling. EXIF orientation is applied, and damaged EXIF
refused. Of a multi-frame file (GIF, TIFF pages), the first frame is used.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imagefolder.errors import ImageFileError

log = logging.getLogger(__name__)

MAX_PIXELS = 89_478_485
"""The largest image read, in pixels (width × height), checked before decoding.

An image is decoded at full size before it is cropped and resized, and a few hundred bytes of a
compressed file can declare billions of pixels (a decompression bomb). The limit equals Pillow's
default warning threshold: an 8-bit RGB picture of this size decodes to 256 MiB, which an 8 GB
Jetson holding the engines can still spare. Pillow's ``Image.MAX_IMAGE_PIXELS`` applies too where
it is lower. Raise this for large images you trust.
"""

BACKGROUND = 255
"""Grey level (0..255) that transparent pixels are composited onto: white.

The model has no alpha channel, so transparency must become a colour. Dropping alpha would show
whatever colour the transparent pixels happen to store (often black, or garbage); white is what
the picture looks like on a page or in a browser, which is how transparent logos, icons and
product shots are made to be seen.
"""

SIXTEEN_BIT = 65535
"""The white point of integer grey images: Pillow reads 16-bit grey as ``I;16*`` or ``I``."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """Read one image file completely, upright, in the form ``to_batch`` takes.

    Args:
        path: the image file (any format Pillow reads).

    Returns:
        An "RGB" image (8-bit sources) or an "F" image with values in [0, 1] (16-bit and float grey
        sources, so that their precision survives the resize).

    Raises:
        ImageFileError: the file cannot be read, is not an image, is over the pixel limit, is
            truncated or damaged (its EXIF included), or holds values outside its mode's range.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 -- closed below; Pillow reads from it lazily
    except OSError as err:
        raise ImageFileError(
            f"cannot read the image {path}: {err.strerror or err}; check the path and its permissions"
        ) from err
    with file:
        picture = _decode(path, file)
    return _normalise(path, picture)


def _decode(path: str | os.PathLike, file) -> Image.Image:
    """Identify, size-check, fully decode and orient the image in ``file``.

    Pillow's bomb warning is recorded rather than printed: our own size check, made on the header
    before decoding, refuses the same images with the exact pixel count. Other warnings Pillow
    raises while reading a file that then decodes are logged against the file's name. (Recording
    warnings changes process-wide state, as ``warnings.catch_warnings`` does: read images from one
    thread.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(file) as img:
                _check_size(path, img.width, img.height)
                img.load()
                upright = _upright(path, img)
        except Image.DecompressionBombError as err:  # over twice Pillow's limit, so over ours too
            raise _too_large(path, _pixels_in(err)) from err
        except UnidentifiedImageError as err:
            raise ImageFileError(
                f"{path} is not an image in a format Pillow reads; give a PNG, JPEG or TIFF file"
            ) from err
        except (OSError, ValueError) as err:
            raise ImageFileError(
                f"the image {path} is truncated or damaged ({err}); export or download it again"
            ) from err
    for warning in caught:
        if not issubclass(warning.category, Image.DecompressionBombWarning):
            log.warning("%s: %s", path, warning.message)
    return upright


def _upright(path: str | os.PathLike, img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Damaged EXIF is refused: guessing around it could turn the picture."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, TypeError, struct.error) as err:  # what Pillow's EXIF parser raises
        raise ImageFileError(
            f"the image {path} has damaged EXIF metadata ({err}); save it again without EXIF, upright"
        ) from err


def _pixel_limit() -> tuple[int, str]:
    """The limit in force and the setting that holds it: ``MAX_PIXELS``, or Pillow's where that is lower."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
        return Image.MAX_IMAGE_PIXELS, "PIL.Image.MAX_IMAGE_PIXELS"
    return MAX_PIXELS, "imagefolder.core.images.MAX_PIXELS"


def _check_size(path: str | os.PathLike, width: int, height: int) -> None:
    if width * height > _pixel_limit()[0]:
        raise _too_large(path, f"{width}×{height} = {width * height:,}")


def _pixels_in(err: Image.DecompressionBombError) -> str:
    """The pixel count in Pillow's bomb error ("Image size (N pixels) exceeds limit of ...")."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return f"{int(found[1]):,}" if found else f"more than {2 * (Image.MAX_IMAGE_PIXELS or MAX_PIXELS):,}"


def _too_large(path: str | os.PathLike, pixels: str) -> ImageFileError:
    limit, setting = _pixel_limit()
    return ImageFileError(
        f"the image {path} has {pixels} pixels, over the limit of {limit:,} ({setting}, a guard "
        "against decompression bombs); downscale it first, or raise the limit if you trust the file"
    )


def _normalise(path: str | os.PathLike, img: Image.Image) -> Image.Image:
    """Any decoded mode → "RGB" (8-bit sources, alpha flattened) or "F" in [0, 1] (16-bit and float grey)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _sixteen_bit_grey(path, img)
    if img.mode == "F":
        return _float_grey(path, img)
    try:
        if not _has_alpha(img):
            return img.convert("RGB")
        background = Image.new("RGBA", img.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert to RGB
        raise ImageFileError(
            f"the image {path} has pixel mode {img.mode}, which cannot be converted to RGB "
            f"({err}); save it as an RGB or greyscale PNG"
        ) from err


def _has_alpha(img: Image.Image) -> bool:
    """An alpha band, or a transparent colour or palette entry (PNG tRNS, GIF). Not LAB's "A" (green–red)."""
    return img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info


def _sixteen_bit_grey(path: str | os.PathLike, img: Image.Image) -> Image.Image:
    """Integer grey → "F" in [0, 1], with 65535 as white (the pixels Pillow's 8-bit conversion clips)."""
    values = np.asarray(img)
    if img.mode == "I" and values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT):
        raise ImageFileError(
            f"the image {path} holds 32-bit integer values from {values.min()} to {values.max()}; "
            f"integer images are read as 16-bit (0..{SIXTEEN_BIT}): rescale it or save it as an "
            "8- or 16-bit PNG"
        )
    grey = values.astype(np.float32) / SIXTEEN_BIT
    if "transparency" in img.info:  # a 16-bit grey PNG's transparent value (tRNS)
        grey[values == img.info["transparency"]] = BACKGROUND / 255
    return Image.fromarray(grey)


def _float_grey(path: str | os.PathLike, img: Image.Image) -> Image.Image:
    """Float grey ("F", e.g. a float TIFF) is read as [0, 1]; values outside it are refused, not clipped."""
    values = np.asarray(img)
    if not np.isfinite(values).all():
        raise ImageFileError(f"the image {path} holds NaN or infinite values; save it without them")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ImageFileError(
            f"the image {path} holds float values from {values.min():g} to {values.max():g}; "
            "float images are read as [0, 1]: rescale it or save it as an 8- or 16-bit PNG"
        )
    return img


def to_batch(pictures: list[Image.Image], size: int) -> np.ndarray:
    """Centre-crop each picture to a square, resize it to ``size`` (Lanczos) and scale it to [-1, 1].

    Args:
        pictures: images from ``read_image`` ("RGB", or "F" in [0, 1]).
        size: the side of the model's input, in pixels.

    Returns:
        (B, 3, size, size) float32 in [-1, 1]: exactly what the encoder is given.
    """
    return np.stack([_to_array(_square(picture, size)) for picture in pictures])


def _square(img: Image.Image, size: int) -> Image.Image:
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def _to_array(img: Image.Image) -> np.ndarray:
    """An "RGB" or "F" picture → (3, H, W) float32 in [-1, 1]."""
    if img.mode == "F":  # Lanczos rings a little past [0, 1]; on 8-bit pictures Pillow clips the same way
        grey = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(grey[None] * 2.0 - 1.0, 3, axis=0)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file (any image ``read_image`` reads) → (side, side) bool, True where it is white (keep).

    The picture is centre-cropped to a square as a reference is (``to_batch``), but not resized: the
    scale grids are laid over it exactly (``core.conditioning.cell_fractions``). A pixel is white when
    its grey level (Pillow's ITU-R 601 luma) is at least half of full scale.
    """
    picture = read_image(path)
    grey = (
        np.asarray(picture, dtype=np.float32)
        if picture.mode == "F"
        else np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    )
    side = min(grey.shape)
    top, left = (grey.shape[0] - side) // 2, (grey.shape[1] - side) // 2
    return grey[top : top + side, left : left + side] >= 0.5


def load_images(paths: list[str | os.PathLike], size: int) -> np.ndarray:
    """Read image files (``read_image``) into one (B, 3, size, size) float32 batch in [-1, 1] (``to_batch``)."""
    return to_batch([read_image(path) for path in paths], size)


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
