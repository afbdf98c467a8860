"""The images the load test sends: real photos in several sizes and both common formats.

Real traffic mixes thumbnails with phone photos, and decode plus resize cost grows with the
pixel count, so each photo is sent at several sizes. The variants are made once at start, in
memory, from the photos in tests/data (or LOADTEST_IMAGES).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "tests" / "data"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
# Longest side of each variant: phone-photo sized (upscaled), medium, and thumbnails.
LONG_SIDES = (1280, 640, 320, 160)


@dataclass(frozen=True)
class LoadImage:
    name: str
    data: bytes = b""
    content_type: str = "image/jpeg"
    width: int = 0
    height: int = 0


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG", optimize=False)
    else:
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_variants(
    folder: str | Path = "", long_sides: Sequence[int] = LONG_SIDES
) -> list[LoadImage]:
    """Every photo of `folder` at every long side, JPEG for photos saved as JPEG and PNG for PNG."""
    root = Path(folder) if folder else DEFAULT_DIR
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no .jpg or .png photos in {root} (set LOADTEST_IMAGES)")
    variants = []
    for path in paths:
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
        for side in long_sides:
            scale = side / max(photo.size)
            size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
            resized = photo.resize(size, Image.BICUBIC)
            variants.append(
                LoadImage(
                    name=f"{path.stem}-{size[0]}x{size[1]}.{fmt.lower().replace('jpeg', 'jpg')}",
                    data=_encode(resized, fmt),
                    content_type=f"image/{fmt.lower()}",
                    width=size[0],
                    height=size[1],
                )
            )
    return variants


def preprocessed_tensor(image: LoadImage, preprocessing: Mapping[str, Any]) -> bytes:
    """The image as the model's input, FP32 [3, crop, crop] little-endian bytes, prepared the
    way the model card says (short side to `resize`, center crop, (x - mean) / std), for V2
    requests that send the `input` tensor instead of an encoded image."""
    resize, crop = int(preprocessing["resize"]), int(preprocessing["crop"])
    with Image.open(io.BytesIO(image.data)) as opened:
        rgb = opened.convert("RGB")
    scale = resize / min(rgb.size)
    size = (max(crop, round(rgb.width * scale)), max(crop, round(rgb.height * scale)))
    rgb = rgb.resize(size, Image.BILINEAR)
    left, top = (rgb.width - crop) // 2, (rgb.height - crop) // 2
    rgb = rgb.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(3, 1, 1)
    return ((pixels - mean) / std).astype("<f4").tobytes()
