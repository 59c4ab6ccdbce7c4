"""Input images: every pixel mode converted to the right values, every bad file refused in one line.

Real files written into tmp_path (Pillow, or by hand for the 16-bit RGB PNG Pillow cannot write);
the pictures are square and read at their own size, so no resampling blurs the values asserted.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFile

from imagefolder.cli.main import main
from imagefolder.core import images
from imagefolder.core.images import load_images, psnr, read_image, to_uint8
from imagefolder.errors import ImageFileError


def pixels(path: Path) -> np.ndarray:
    """The picture as the encoder gets it, (H, W, 3) in [-1, 1], at the file's own (square) size."""
    with Image.open(path) as img:
        side = img.width
    return load_images([path], side)[0].transpose(1, 2, 0)


def mode_of(path: Path) -> str:
    """The pixel mode Pillow reads the file as."""
    with Image.open(path) as img:
        return img.mode


def from_8bit(values) -> np.ndarray:
    """Expected [-1, 1] values for 8-bit levels."""
    return np.asarray(values, dtype=np.float64) / 127.5 - 1.0


def from_16bit(values) -> np.ndarray:
    """Expected [-1, 1] values for 16-bit levels."""
    return np.asarray(values, dtype=np.float64) / 65535 * 2.0 - 1.0


def grey(levels: np.ndarray) -> np.ndarray:
    """(H, W) levels → (H, W, 3): a grey picture has three equal channels."""
    return np.repeat(np.asarray(levels, dtype=np.float64)[..., None], 3, axis=-1)


def write_png_rgb16(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit RGB PNG, (H, W, 3) uint16, written chunk by chunk (Pillow has no 16-bit RGB mode to save)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = samples.shape
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)  # filter byte 0 per row
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


# -- 16-bit and float grey: scaled, never clipped -----------------------------------------------------

LEVELS_16 = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(LEVELS_16).save(path)  # Pillow writes mode I;16 as a 16-bit grey PNG
    assert mode_of(path) == "I;16"
    got = pixels(path)
    np.testing.assert_allclose(got, grey(from_16bit(LEVELS_16)), atol=1e-6)
    assert abs(got[0, 1, 0]) < 1e-4 and got[1, 0, 0] == 1.0  # 32768 → 0.0 (mid grey), 65535 → 1.0
    assert got[1, 1, 0] < -0.96  # 1000 is near black; Pillow's own convert("RGB") makes it 255 (white)


def test_16bit_big_endian_tiff_is_scaled(tmp_path):
    path = tmp_path / "grey16b.tif"
    Image.frombytes("I;16B", (2, 2), LEVELS_16.astype(">u2").tobytes()).save(path)
    assert mode_of(path) == "I;16B"
    np.testing.assert_allclose(pixels(path), grey(from_16bit(LEVELS_16)), atol=1e-6)


def test_16bit_pgm_read_as_mode_i_is_scaled(tmp_path):
    path = tmp_path / "grey16.pgm"
    path.write_bytes(b"P5 2 2 65535\n" + LEVELS_16.astype(">u2").tobytes())
    assert mode_of(path) == "I"  # how Pillow reads 16-bit PGM (and, before Pillow 10, 16-bit PNG)
    np.testing.assert_allclose(pixels(path), grey(from_16bit(LEVELS_16)), atol=1e-6)


def test_16bit_precision_survives_the_resize(tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(path)
    value = load_images([path], 4)[0, 0, 0, 0]
    assert value == pytest.approx(30000 / 65535 * 2 - 1, abs=1e-6)  # 8 bits would give 117/127.5 - 1


def test_32bit_integer_image_outside_16bit_range_is_refused(tmp_path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 70000], [5, 6]], np.int32)).save(path)
    with pytest.raises(ImageFileError, match=r"int32\.tif holds 32-bit integer values from 0 to 70000.*16-bit"):
        read_image(path)


def test_16bit_rgb_png_keeps_its_scale(tmp_path):
    """Pillow 13 reads a 16-bit RGB PNG as 8-bit RGB, keeping each sample's high byte: the scale is right,
    the precision 8 bits. The mode and exact values pin that down: a Pillow that keeps 16 bits fails here."""
    samples = np.array(
        [[[65535, 0, 32768], [256, 65280, 4660]], [[1000, 2000, 3000], [65535, 65535, 65535]]], dtype=np.uint16
    )
    path = write_png_rgb16(tmp_path / "rgb16.png", samples)
    assert mode_of(path) == "RGB"
    got = pixels(path)
    np.testing.assert_allclose(got, from_16bit(samples), atol=1 / 127.5)  # within one 8-bit level
    np.testing.assert_allclose(got[0, 0], from_8bit([255, 0, 128]), atol=1e-6)  # 32768 → 128, not 255
    np.testing.assert_allclose(got[0, 1], from_8bit([1, 255, 18]), atol=1e-6)  # high bytes of 256, 65280, 4660


def test_float_grey_tiff_is_read_as_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)).save(path)
    assert mode_of(path) == "F"
    np.testing.assert_allclose(pixels(path), grey([[-1.0, 0.0], [1.0, -0.5]]), atol=1e-6)


@pytest.mark.parametrize(
    "value, message",
    [(2.0, "from 0 to 2; float images are read as [0, 1]"), (np.nan, "NaN or infinite")],
    ids=["above-one", "nan"],
)
def test_float_grey_outside_unit_range_is_refused(tmp_path, value, message):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, value], [1.0, 0.25]], np.float32)).save(path)
    with pytest.raises(ImageFileError, match=re.escape(message)):
        read_image(path)


# -- 8-bit modes, palettes and alpha -------------------------------------------------------------------


def palette_image(indices, colours) -> Image.Image:
    """A 2×2 palette ("P") image: ``indices`` into ``colours``."""
    img = Image.new("P", (2, 2))
    img.putpalette([c for colour in colours for c in colour])
    img.putdata([i for row in indices for i in row])
    return img


RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)

EIGHT_BIT = {
    # id: (mode as read back, image, file name, save options, expected 8-bit RGB levels of the 2×2 picture)
    "rgb": (
        "RGB",
        Image.fromarray(np.array([[RED, GREEN], [BLUE, (12, 34, 56)]], np.uint8)),
        "a.png",
        {},
        [[RED, GREEN], [BLUE, (12, 34, 56)]],
    ),
    "grey-L": (
        "L",
        Image.fromarray(np.array([[0, 255], [128, 64]], np.uint8)),
        "a.png",
        {},
        [[BLACK, WHITE], [(128,) * 3, (64,) * 3]],
    ),
    "1-bit": ("1", Image.fromarray(np.array([[0, 1], [1, 0]], bool)), "a.png", {}, [[BLACK, WHITE], [WHITE, BLACK]]),
    "palette": (
        "P",
        palette_image([[0, 1], [2, 3]], [RED, GREEN, BLUE, (10, 20, 30)]),
        "a.png",
        {},
        [[RED, GREEN], [BLUE, (10, 20, 30)]],
    ),
    "palette-transparent-index": (
        "P",
        palette_image([[0, 1], [2, 1]], [RED, BLACK, BLUE]),
        "a.png",
        {"transparency": 1},
        [[RED, WHITE], [BLUE, WHITE]],
    ),
    "palette-alpha-per-entry": (
        "P",
        palette_image([[0, 1], [2, 1]], [RED, BLACK, BLUE]),
        "a.png",
        {"transparency": bytes([255, 128, 0])},
        [[RED, (127,) * 3], [WHITE, (127,) * 3]],
    ),
    "gif-transparent-index": (
        "P",
        palette_image([[0, 1], [2, 1]], [RED, BLACK, BLUE]),
        "a.gif",
        {"transparency": 1},
        [[RED, WHITE], [BLUE, WHITE]],
    ),
    "rgba": (
        "RGBA",
        Image.fromarray(np.array([[(255, 0, 0, 128), (0, 0, 0, 0)], [(0, 0, 255, 255), (0, 0, 0, 128)]], np.uint8)),
        "a.png",
        {},
        [[(255, 127, 127), WHITE], [BLUE, (127,) * 3]],
    ),
    "grey-alpha-LA": (
        "LA",
        Image.fromarray(np.array([[(0, 128), (100, 255)], [(7, 0), (255, 255)]], np.uint8), "LA"),
        "a.png",
        {},
        [[(127,) * 3, (100,) * 3], [WHITE, WHITE]],
    ),
    "grey-transparent-value": (
        "L",
        Image.fromarray(np.array([[0, 100], [100, 0]], np.uint8)),
        "a.png",
        {"transparency": 100},
        [[BLACK, WHITE], [WHITE, BLACK]],
    ),
    "rgb-transparent-colour": (
        "RGB",
        Image.fromarray(np.array([[RED, BLUE], [BLUE, RED]], np.uint8)),
        "a.png",
        {"transparency": RED},
        [[WHITE, BLUE], [BLUE, WHITE]],
    ),
    "cmyk": (
        "CMYK",
        Image.frombytes("CMYK", (2, 2), bytes([0, 255, 255, 0, 0, 0, 0, 255, 0, 0, 0, 0, 255, 0, 0, 0])),
        "a.tif",
        {},
        [[RED, BLACK], [WHITE, (0, 255, 255)]],
    ),
    "ycbcr": (
        "YCbCr",
        Image.frombytes("YCbCr", (2, 2), bytes([255, 128, 128, 0, 128, 128, 128, 128, 128, 76, 85, 255])),
        "a.tif",
        {},
        [[WHITE, BLACK], [(128,) * 3, (254, 0, 0)]],
    ),  # (76, 85, 255): red to within a level
}


@pytest.mark.parametrize("case", EIGHT_BIT.values(), ids=EIGHT_BIT.keys())
def test_8bit_modes_become_the_right_rgb(tmp_path, case):
    mode, img, name, options, expected = case
    path = tmp_path / name
    img.save(path, **options)
    assert mode_of(path) == mode
    np.testing.assert_allclose(pixels(path), from_8bit(expected), atol=1e-6)


def test_16bit_grey_transparent_value_becomes_background(tmp_path):
    path = tmp_path / "grey16t.png"
    Image.fromarray(LEVELS_16).save(path, transparency=1000)
    np.testing.assert_allclose(pixels(path), grey(from_16bit([[0, 32768], [65535, 65535]])), atol=1e-6)


def test_background_is_the_documented_constant(tmp_path, monkeypatch):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (2, 2), (200, 10, 10, 0)).save(path)
    monkeypatch.setattr(images, "BACKGROUND", 0)
    np.testing.assert_allclose(pixels(path), -1.0)  # fully transparent over black: black, not the stored red


# -- EXIF orientation ----------------------------------------------------------------------------------

CORNERS = np.array([[RED, GREEN], [BLUE, WHITE]], np.uint8)  # stored top-left, top-right / bottom-left, right


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (1, [[RED, GREEN], [BLUE, WHITE]]),
        (3, [[WHITE, BLUE], [GREEN, RED]]),  # stored upside down
        (6, [[BLUE, RED], [WHITE, GREEN]]),  # shown turned 90° clockwise (a phone held upright)
        (8, [[GREEN, WHITE], [RED, BLUE]]),  # shown turned 90° anticlockwise
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, upright):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    Image.fromarray(CORNERS).save(path, exif=exif)
    np.testing.assert_allclose(pixels(path), from_8bit(upright), atol=1e-6)


def test_exif_rotated_photo_is_upright_and_keeps_its_shape(tmp_path):
    """A JPEG as a camera writes it: 64 wide × 32 high stored, shown 32 × 64 after a quarter turn."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = RED  # the stored left half is red, the right half blue
    stored[:, 32:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    assert read_image(path).size == (32, 64)  # upright: 32 wide, 64 high
    got = load_images([path], 32)[0].transpose(1, 2, 0)  # the centre square of the upright picture
    np.testing.assert_allclose(got[2, 2], from_8bit(RED), atol=0.05)  # the red half is now on top
    np.testing.assert_allclose(got[-3, -3], from_8bit(BLUE), atol=0.05)


def test_damaged_exif_is_refused_not_guessed_around(tmp_path):
    path = tmp_path / "bad-exif.png"
    Image.fromarray(CORNERS).save(path, exif=b"MM\x00x\x00\x00\x00\x08")  # not a TIFF header: Pillow raises SyntaxError
    with pytest.raises(ImageFileError, match=r"bad-exif\.png has damaged EXIF metadata \(not a TIFF file"):
        read_image(path)


# -- bad files: one ImageFileError naming the file ---------------------------------------------------


def good_png(path: Path, side: int = 8) -> Path:
    Image.fromarray((np.random.default_rng(side).random((side, side, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_non_image_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are notes, not pixels")
    with pytest.raises(ImageFileError, match=r"notes\.png is not an image"):
        read_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused_not_padded(tmp_path, fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing we import turns Pillow's padding on
    whole = tmp_path / f"whole.{fmt.lower()}"
    Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)).save(whole, fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with Image.open(cut) as img:
        assert img.size == (96, 96)  # the header is intact: only decoding finds the missing half
    with pytest.raises(ImageFileError, match=rf"cut\.{fmt.lower()} is truncated or damaged"):
        read_image(cut)


def test_damaged_header_is_refused(tmp_path):
    path = tmp_path / "zero.pgm"
    path.write_bytes(b"P5 2 2 0\n" + bytes(4))  # a maximum grey level of 0: Pillow raises ValueError
    with pytest.raises(ImageFileError, match=r"zero\.pgm is truncated or damaged \(maxval must be"):
        read_image(path)


def test_image_over_max_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    whole = good_png(tmp_path / "whole.png", 40)
    path = tmp_path / "big.png"
    path.write_bytes(whole.read_bytes()[:100])  # the header and no pixels: refused for its size, not as truncated
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(
        ImageFileError,
        match=r"big\.png has 40×40 = 1,600 pixels, over the limit of 1,000 "
        r"\(imagefolder\.core\.images\.MAX_PIXELS",
    ):
        read_image(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 1600)
    assert read_image(whole).size == (40, 40)  # the limit is inclusive


def test_pillow_bomb_warning_becomes_our_error(tmp_path, monkeypatch):
    """Pillow warns between its limit and twice it; the image is refused with the exact count, not warned about."""
    path = good_png(tmp_path / "warned.png", 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bomb warning escaping would fail the test
        with pytest.raises(
            ImageFileError,
            match=r"warned\.png has 40×40 = 1,600 pixels, over the limit of 1,000 "
            r"\(PIL\.Image\.MAX_IMAGE_PIXELS",
        ):
            read_image(path)


def test_pillow_bomb_error_becomes_our_error(tmp_path, monkeypatch):
    path = good_png(tmp_path / "bomb.png", 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # 4,096 pixels, over twice Pillow's limit: Pillow itself refuses
    with pytest.raises(ImageFileError, match=r"bomb\.png has 4,096 pixels, over the limit of 1,000") as caught:
        read_image(path)
    assert isinstance(caught.value.__cause__, Image.DecompressionBombError)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p / "missing.png", "No such file or directory"),
        (lambda p: p, "Is a directory"),
    ],
    ids=["missing", "directory"],
)
def test_unreadable_path_is_refused(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageFileError, match=rf"cannot read the image {re.escape(str(path))}: {reason}"):
        read_image(path)


# -- PSNR: against exactly the picture the encoder was given --------------------------------------------


def test_psnr_of_a_16bit_picture_uses_the_same_scale_as_its_reconstruction(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(LEVELS_16).save(path)
    batch = load_images([path], 2)
    assert psnr(batch, batch) == [float("inf")]
    np.testing.assert_array_equal(to_uint8(batch)[0, :, :, 0], [[0, 128], [255, 4]])  # 1000/65535·255 = 3.9
    darker = batch - 2 / 127.5  # two 8-bit levels darker: [[0 (clipped), 126], [253, 2]]
    assert psnr(batch, darker)[0] == pytest.approx(10 * np.log10(255**2 / 3))  # squared errors 0, 4, 4, 4


def test_reconstruct_16bit_png_prints_psnr_of_the_grid_it_writes(tmp_path):
    """The default model (64 px): the grid's top row is the input as the encoder saw it (not clipped to white),
    and the printed PSNR is the PSNR between the grid's two rows."""
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # a full-range ramp
    path = tmp_path / "ramp16.png"
    Image.fromarray(levels).save(path)
    out = tmp_path / "recon.png"
    result = CliRunner().invoke(main, ["reconstruct", str(path), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = float(re.search(r"ramp16\.png: PSNR ([\d.]+) dB", result.output)[1])
    with Image.open(out) as img:
        grid = np.asarray(img.convert("RGB"))
    top, bottom = grid[:64], grid[66:]  # input above its reconstruction, 2 px apart
    expected_top = np.rint(levels / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(top, np.repeat(expected_top[..., None], 3, axis=-1))
    mse = np.mean((top.astype(float) - bottom.astype(float)) ** 2)
    assert printed == pytest.approx(10 * np.log10(255**2 / mse), abs=0.005)


# -- the command line: one line, exit code 1, outputs untouched ---------------------------------------


def not_an_image(folder: Path) -> Path:
    path = folder / "notes.png"
    path.write_text("these are notes, not pixels")
    return path


def truncated_png(folder: Path) -> Path:
    data = good_png(folder / "whole.png", 64).read_bytes()
    path = folder / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def a_folder(folder: Path) -> Path:
    (folder / "album").mkdir()
    return folder / "album"


def over_max_pixels(folder: Path, monkeypatch) -> Path:
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    return good_png(folder / "big.png", 40)


def pillow_bomb(folder: Path, monkeypatch) -> Path:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64×64 is over twice this: Pillow's own error
    return good_png(folder / "bomb.png", 64)


BAD_INPUTS = {
    "non-image": (lambda folder, mp: not_an_image(folder), "is not an image"),
    "truncated": (lambda folder, mp: truncated_png(folder), "is truncated or damaged"),
    "bomb-over-max-pixels": (over_max_pixels, "over the limit of 1,000"),
    "bomb-pillow-error": (pillow_bomb, "has 4,096 pixels, over the limit of 1,000"),
    "missing-path": (lambda folder, mp: folder / "nowhere.png", "No such file or directory"),
    "directory-path": (lambda folder, mp: a_folder(folder), "Is a directory"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_reconstruct_refuses_bad_input_in_one_line(tmp_path, monkeypatch, kind):
    make, reason = kind
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = good_png(inputs / "good.png", 8)  # under every limit the cases set
    bad = make(inputs, monkeypatch)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    previous = good_png(outputs / "previous.png", 16)
    before = previous.read_bytes()
    for output in (previous, outputs / "new.png"):
        result = CliRunner().invoke(
            main, ["reconstruct", str(good), str(bad), "-o", str(output)], catch_exceptions=False
        )
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert str(bad) in lines[0] and reason in lines[0], lines[0]
        assert "Traceback" not in result.output
    assert previous.read_bytes() == before  # the previous output is intact
    assert sorted(p.name for p in outputs.iterdir()) == ["previous.png"]  # nothing new, not even a temp file


def test_reconstruct_refuses_a_non_image_in_a_real_process(tmp_path):
    bad = not_an_image(tmp_path)
    script = Path(sys.executable).with_name("imagefolder")  # the console script installed beside this Python
    result = subprocess.run(
        [str(script), "reconstruct", str(bad), "-o", str(tmp_path / "out.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Error: {bad} is not an image in a format Pillow reads; give a PNG, JPEG or TIFF file"
    ]
    assert not (tmp_path / "out.png").exists()
