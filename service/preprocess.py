"""Image bytes to a model input: decode, orient, convert to RGB, resize, crop, normalize.

Everything here is plain Pillow and numpy and runs in a thread pool (`Preprocessor`), so the
event loop keeps accepting requests while images decode. The pixel limit is checked from the
header, before any pixel is decoded, which is what stops decompression bombs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile, ImageOps

from service.engine.protocol import Preprocessing
from service.errors import BadImageError

# Formats a camera, phone or browser produces; fewer decoders means less attack surface.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

# Truncated files are a client's mistake; refuse them instead of decoding gray padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _openable_formats() -> tuple[str, ...]:
    # `formats=` raises KeyError on names without an opener of their own (MPO opens through
    # JPEG), so pass only the registered ones.
    Image.init()
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing empty, unknown, oversized and broken files."""
    if not data:
        raise BadImageError("empty image: the body or field carried no bytes")
    try:
        with warnings.catch_warnings():
            # The pixel check below replaces Pillow's process-wide bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_openable_formats())
    except Image.DecompressionBombError:
        # Pillow's own check, at twice its default limit, fires before ours can.
        raise BadImageError(
            f"image header claims far more pixels than the limit of {max_pixels} "
            "(ESCORT_MAX_IMAGE_PIXELS): refused as a decompression bomb"
        ) from None
    except Exception:
        raise BadImageError(
            "not a readable image; send JPEG, PNG, WebP, GIF, BMP, TIFF or PPM bytes"
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImageError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (ESCORT_MAX_IMAGE_PIXELS); send a smaller image"
        )
    return image


def _decode(image: Image.Image, min_side: int) -> Image.Image:
    if image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L", "CMYK"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays larger than
        # needed: several times faster on phone photos, and the resize antialiases anyway.
        image.draft(image.mode, (min_side, min_side))
    try:
        image.load()
    except Exception as exc:
        raise BadImageError(f"image data is truncated or corrupt ({exc})") from None
    # A malformed EXIF block only loses the orientation.
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _HIGH_DEPTH_MODES:
        # Pillow would clip 16-bit values at 255; scale the used range down instead.
        values = np.asarray(image, dtype=np.float32)
        top = float(values.max()) if values.size else 0.0
        if mode == "F" and top <= 1.0:
            values = values * 255.0
        elif top > 255.0:
            values = values * (255.0 / 65535.0) if top <= 65535.0 else values * (255.0 / top)
        gray = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's own conversions.
    return image.convert("RGB")


def resize_crop(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """Resize the short side to `spec.resize`, then take the centered `spec.crop` square.

    The crop window is mapped back to the source and resampled in one step, which gives the
    same picture as resizing the whole image first, without building a huge intermediate for
    a very long, thin image.
    """
    width, height = image.size
    if width <= height:
        new_w, new_h = spec.resize, max(1, int(spec.resize * height / width))
    else:
        new_w, new_h = max(1, int(spec.resize * width / height)), spec.resize
    scale_x, scale_y = width / new_w, height / new_h
    left = round((new_w - spec.crop) / 2.0)
    top = round((new_h - spec.crop) / 2.0)
    box = (
        left * scale_x,
        top * scale_y,
        (left + spec.crop) * scale_x,
        (top + spec.crop) * scale_y,
    )
    return image.resize((spec.crop, spec.crop), Image.Resampling.BILINEAR, box=box)


def normalize(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image (0-255) to float32 CHW, (x - mean) / std per channel in 0-255 units."""
    pixels = np.asarray(image, dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    chw = ((pixels - mean) / std).transpose(2, 0, 1)
    return np.ascontiguousarray(chw)


_EXIF_ORIENTATION = 0x0112


def engine_decodable(data: bytes, max_pixels: int, max_bytes: int | None) -> bool:
    """True when the engine can decode this photo itself and get what `preprocess_image`
    would (ESCORT_IMAGE_DECODE=engine): a JPEG, RGB or gray, upright (no EXIF rotation),
    within the pixel limit and the row size. Reads the header only; anything else is decoded
    here, where every format and mode is handled."""
    if max_bytes is not None and len(data) > max_bytes:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return False  # not a JPEG, or a header Pillow refuses: the workers' path says why
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and 0 < width * height <= max_pixels
        and orientation == 1
    )


def preprocess_image(data: bytes, spec: Preprocessing, max_pixels: int) -> np.ndarray:
    """Encoded image bytes to the model's float32 [3, crop, crop] input."""
    image = open_image(data, max_pixels)
    image = _decode(image, min_side=spec.resize)
    image = to_rgb(image)
    return normalize(resize_crop(image, spec), spec)


class Preprocessor:
    """Runs `preprocess_image` in a thread pool and reports each image's time."""

    def __init__(
        self,
        workers: int,
        max_pixels: int,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
        self._max_pixels = max_pixels
        self._observe = observe

    def _timed(self, model: str, data: bytes, spec: Preprocessing, where: str) -> np.ndarray:
        start = time.monotonic()
        try:
            tensor = preprocess_image(data, spec, self._max_pixels)
        except BadImageError as exc:
            raise BadImageError(f"{where}: {exc.message}" if where else exc.message) from None
        if self._observe is not None:
            self._observe(model, time.monotonic() - start)
        return tensor

    async def images_to_batch(
        self, model: str, images: list[bytes], spec: Preprocessing
    ) -> np.ndarray:
        """Preprocess several images in parallel into one float32 [N, 3, crop, crop] array."""
        loop = asyncio.get_running_loop()
        many = len(images) > 1
        jobs = [
            loop.run_in_executor(
                self._pool, self._timed, model, data, spec, f"image {i + 1}" if many else ""
            )
            for i, data in enumerate(images)
        ]
        try:
            tensors = await asyncio.gather(*jobs)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return np.stack(tensors)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
