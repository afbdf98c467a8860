"""Preprocessing against ground truth: torchvision's Resize+CenterCrop, hand-made images of
every mode, EXIF orientation, and images that must be refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.engine.protocol import Preprocessing
from service.errors import BadImageError
from service.preprocess import engine_decodable, preprocess_image, resize_crop, to_rgb
from tests.service.fakes import encode_image

SPEC = Preprocessing(resize=256, crop=224, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
IDENTITY = Preprocessing(resize=256, crop=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
LIMIT = 50_000_000


def _pixels(data: bytes, spec: Preprocessing = IDENTITY) -> np.ndarray:
    """Preprocessed image back in HWC 0-255, for comparing with plain pixels."""
    return preprocess_image(data, spec, LIMIT).transpose(1, 2, 0)


@pytest.mark.parametrize("name", ["cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.png"])
def test_matches_torchvision_resize_and_center_crop(photos: dict[str, bytes], name: str) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    image = Image.open(io.BytesIO(photos[name])).convert("RGB")
    expected = np.asarray(
        transforms.CenterCrop(224)(transforms.Resize(256)(image)), dtype=np.float32
    )
    got = np.asarray(resize_crop(image, IDENTITY), dtype=np.float32)
    assert got.shape == (224, 224, 3)
    assert np.abs(got - expected).max() <= 1.0  # one level of rounding at most
    assert np.abs(got - expected).mean() < 0.01


def test_normalization_and_layout(photos: dict[str, bytes]) -> None:
    tensor = preprocess_image(photos["cat.jpg"], SPEC, LIMIT)
    assert tensor.dtype == np.float32 and tensor.shape == (3, 224, 224)
    assert tensor.flags["C_CONTIGUOUS"]
    raw = _pixels(photos["cat.jpg"])
    np.testing.assert_allclose(tensor, (raw.transpose(2, 0, 1) - 127.0) / 128.0, atol=1e-6)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_channel_order_is_rgb() -> None:
    data = encode_image(Image.new("RGB", (300, 300), (255, 0, 0)))
    pixels = _pixels(data)
    assert np.allclose(pixels[..., 0], 255) and np.allclose(pixels[..., 1:], 0)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 257 * 40, (40, 40, 40)),
        ("I", 30000, (116, 116, 116)),
        ("F", 0.5, (127, 127, 127)),
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # transparent: composited on white
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (50, 255), (50, 50, 50)),
    ],
)
def test_every_mode_becomes_rgb(mode: str, value, expected: tuple[int, int, int]) -> None:
    image = Image.new(mode, (8, 8), value)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb, dtype=int)[0, 0] - expected).max() <= 1


def test_palette_with_transparency() -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == (10, 200, 30)
    image.info["transparency"] = 1
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM"])
def test_accepted_formats(fmt: str) -> None:
    image = Image.new("RGB", (320, 240), (200, 120, 40))
    if fmt == "GIF":
        image = image.convert("P")
    tensor = preprocess_image(encode_image(image, fmt), SPEC, LIMIT)
    assert tensor.shape == (3, 224, 224) and np.isfinite(tensor).all()


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    gray = np.full((64, 64), 20000, dtype=np.uint16)
    data = encode_image(Image.fromarray(gray))
    pixels = _pixels(data)
    assert np.allclose(pixels, round(20000 / 257), atol=1)


def test_exif_orientation_is_applied() -> None:
    # Left half red, right half blue; EXIF 6 says "rotate 90 degrees clockwise to view".
    array = np.zeros((300, 400, 3), dtype=np.uint8)
    array[:, :200] = (255, 0, 0)
    array[:, 200:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_image(Image.fromarray(array), "JPEG", exif=exif, quality=95)
    pixels = _pixels(data)
    # After the rotation red is on top and blue below.
    assert pixels[10, 112, 0] > 200 and pixels[10, 112, 2] < 60
    assert pixels[-10, 112, 2] > 200 and pixels[-10, 112, 0] < 60


def test_long_thin_and_tiny_images() -> None:
    for size in [(1, 1), (1, 5000), (3000, 2), (224, 224)]:
        tensor = preprocess_image(encode_image(Image.new("RGB", size, (9, 9, 9))), SPEC, LIMIT)
        assert tensor.shape == (3, 224, 224)
        np.testing.assert_allclose(tensor, (9 - 127) / 128, atol=1e-5)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), c).convert("P") for c in [(255, 0, 0), (0, 255, 0)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    pixels = _pixels(buffer.getvalue())
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 50


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims another size: a decompression bomb's header."""
    data = bytearray(encode_image(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    struct.pack_into(">II", data, ihdr + 4, width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    struct.pack_into(">I", data, ihdr + 17, crc)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"hello, this is text", "not a readable image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a readable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
        (png_with_size(10000, 10000), "above the limit of 50000000"),
        (png_with_size(100_000, 100_000), "decompression bomb"),
    ],
)
def test_refused_images(data: bytes, message: str) -> None:
    with pytest.raises(BadImageError, match=message):
        preprocess_image(data, SPEC, LIMIT)


def test_pixel_limit_is_the_setting(photos: dict[str, bytes]) -> None:
    with pytest.raises(BadImageError, match="ESCORT_MAX_IMAGE_PIXELS"):
        preprocess_image(photos["cat.jpg"], SPEC, max_pixels=451 * 300 - 1)
    assert preprocess_image(photos["cat.jpg"], SPEC, max_pixels=451 * 300).shape == (3, 224, 224)


def test_truncated_and_corrupt_photos(photos: dict[str, bytes]) -> None:
    jpeg = photos["cat.jpg"]
    with pytest.raises(BadImageError, match="truncated or corrupt"):
        preprocess_image(jpeg[: len(jpeg) // 2], SPEC, LIMIT)
    png = photos["astronaut.png"]
    with pytest.raises(BadImageError):
        preprocess_image(png[: len(png) // 3], SPEC, LIMIT)
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = b"\xff" * 64
    with pytest.raises(BadImageError):
        preprocess_image(bytes(corrupt), SPEC, LIMIT)


def test_which_photos_the_engine_may_decode(photos: dict[str, bytes]) -> None:
    limit = 50_000_000
    cat = photos["cat.jpg"]
    assert engine_decodable(cat, limit, None)
    assert engine_decodable(encode_image(Image.new("L", (40, 30), 9), "JPEG"), limit, None)
    assert not engine_decodable(cat, limit, len(cat) - 1)  # does not fit a row
    assert not engine_decodable(cat, 1000, None)  # over the pixel limit
    assert not engine_decodable(encode_image(Image.new("RGB", (40, 30)), "PNG"), limit, None)
    assert not engine_decodable(encode_image(Image.new("CMYK", (40, 30)), "JPEG"), limit, None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the workers apply it, the engine's decoder would not
    rotated = encode_image(Image.new("RGB", (40, 30)), "JPEG", exif=exif.tobytes())
    assert not engine_decodable(rotated, limit, None)
    assert not engine_decodable(b"not an image", limit, None)
    assert engine_decodable(cat[: len(cat) // 2], limit, None)  # the header is fine: decoded
    # there, and a failure comes back as that request's 400 (tests/core/test_image_decode.py)
