"""JPEG photos decoded and prepared by the engine, batched, on its device (ESCORT_IMAGE_DECODE=engine).

`torchvision.io.decode_jpeg` takes a list of encoded images and, on CUDA, decodes them with
nvJPEG in one call; resizing, cropping and normalizing then run on the same device. This is
the same preprocessing as `service.preprocess` (short side to `resize`, bilinear with
antialiasing, centered `crop`, (x - mean) / std), done with torch ops instead of Pillow, so the
numbers agree closely but not bit for bit. Only the images the HTTP worker checked
(`service.preprocess.engine_decodable`: baseline-orientation JPEG, RGB or gray, within the pixel
limit) come here; one that still fails to decode is reported by index, not by failing its batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from service.engine.protocol import Preprocessing


def is_encoded(row: np.ndarray) -> bool:
    """An encoded image travels as a 1-D uint8 row; a preprocessed one as float [3, H, W]."""
    return row.dtype == np.uint8 and row.ndim == 1


def _decode(data: torch.Tensor | list[torch.Tensor], device: torch.device):
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still
        # work, and the GPU image this runs on has torchvision 0.26. Revisit with torchcodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_all(rows: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor | None]:
    # Arena rows are writable views (no copy); a read-only request buffer is copied.
    data = [torch.from_numpy(row if row.flags.writeable else row.copy()) for row in rows]
    try:
        return list(_decode(data, device))
    except RuntimeError:
        # One bad image fails the batched call: decode one at a time to find which.
        decoded: list[torch.Tensor | None] = []
        for item in data:
            try:
                decoded.append(_decode(item, device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def _constants(spec: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as [1, 3, 1, 1] tensors on `device`, made once: building them per photo
    was two synchronous host-to-device copies each."""
    key = (spec.mean, spec.std, str(device))
    found = _CONSTANTS.get(key)
    if found is None:
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        found = _CONSTANTS.setdefault(key, (mean, std))
    return found


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def prepare_group(images: Sequence[torch.Tensor], spec: Preprocessing) -> torch.Tensor:
    """uint8 [3, h, w] photos of one size -> float32 [k, 3, crop, crop], on their device, in
    one resize, one crop and one normalization for the group."""
    _, height, width = images[0].shape
    if width <= height:
        new_w, new_h = spec.resize, max(1, int(spec.resize * height / width))
    else:
        new_w, new_h = max(1, int(spec.resize * width / height)), spec.resize
    batch = torch.stack(list(images)).float()
    resized = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", antialias=True)
    top = round((new_h - spec.crop) / 2.0)
    left = round((new_w - spec.crop) / 2.0)
    crop = resized[:, :, top : top + spec.crop, left : left + spec.crop].clamp_(0, 255)
    mean, std = _constants(spec, images[0].device)
    return crop.sub_(mean).div_(std)


def prepare(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """uint8 [3, h, w] -> float32 [3, crop, crop], on the image's device."""
    return prepare_group([image], spec)[0]


def decode_rows(
    rows: Sequence[np.ndarray], spec: Preprocessing, device: torch.device
) -> tuple[list[torch.Tensor | None], list[int]]:
    """Prepared float32 [3, crop, crop] tensors for the encoded rows (None where one failed),
    and the indices of the failures. Photos of the same decoded size are prepared together."""
    decoded = _decode_all(rows, device)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(decoded):
        if image is not None:
            by_size.setdefault(tuple(image.shape), []).append(i)
    prepared: list[torch.Tensor | None] = [None] * len(decoded)
    for indices in by_size.values():
        group = prepare_group([decoded[i] for i in indices], spec)  # type: ignore[misc]
        for j, i in enumerate(indices):
            prepared[i] = group[j]
    return prepared, [i for i, image in enumerate(decoded) if image is None]
