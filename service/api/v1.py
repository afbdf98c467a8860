"""The simple v1 API: classify uploaded images, and the model cards."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile

from service.api.deps import (
    get_state,
    media_type,
    read_body,
    require_api_key,
    set_backend_label,
    unless_disconnected,
)
from service.api.state import top_k
from service.engine.protocol import ModelDescription
from service.errors import BadImageError, BadInputError, UnsupportedMediaTypeError

router = APIRouter(prefix="/v1", tags=["v1"])

IMAGE_FIELD = "image"
_RAW_TYPES = ("application/octet-stream",)


def _plain(value: Any) -> Any:
    """Engine cards may hold numpy scalars and tuples; JSON wants plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def model_card(desc: ModelDescription, ready: bool) -> dict[str, Any]:
    prep = desc.preprocessing
    card: dict[str, Any] = {
        "name": desc.name,
        "architecture": desc.architecture,
        "ready": ready,
        "device": desc.device,
        "precision": desc.precision,
        "backends": list(desc.backends),
        "default_backend": desc.backends[0] if desc.backends else None,
        "max_batch_size": desc.max_batch_size,
        "num_classes": desc.num_classes,
        "input_shape": list(desc.input_shape),
        "preprocessing": {
            "resize": prep.resize,
            "crop": prep.crop,
            "mean": list(prep.mean),
            "std": list(prep.std),
        },
        "layer_sparsity": dict(desc.layer_sparsity),
    }
    for key, value in desc.card.items():
        card.setdefault(key, value)
    return _plain(card)


async def _images_from_multipart(request: Request) -> tuple[list[bytes], list[str]]:
    settings = get_state(request).settings
    form = await request.form(
        max_files=settings.max_images_per_request,
        max_fields=settings.max_images_per_request + 16,
        max_part_size=settings.max_request_bytes,
    )
    try:
        parts = form.getlist(IMAGE_FIELD)
        if not parts:
            found = sorted(set(form.keys()))
            raise BadInputError(
                f"the multipart body has no {IMAGE_FIELD!r} field (found: {found or 'none'}); "
                f"send files as `curl -F {IMAGE_FIELD}=@photo.jpg`"
            )
        images, names = [], []
        for index, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise BadImageError(
                    f"{IMAGE_FIELD!r} field {index + 1} is text, not a file; send it as a file "
                    f"part (`curl -F {IMAGE_FIELD}=@photo.jpg`)"
                )
            images.append(await part.read())
            names.append(part.filename or f"{IMAGE_FIELD}{index + 1}")
        return images, names
    finally:
        await form.close()


@router.post("/models/{model}/classify", dependencies=[Depends(require_api_key)])
async def classify(
    request: Request,
    model: str,
    top_k_: int = Query(5, alias="top_k", ge=1, description="How many labels per image."),
    backend: str | None = Query(None, description="A loaded backend; default: the server's."),
) -> dict[str, Any]:
    """Classify images sent as multipart `image` fields or as a raw image body."""
    state = get_state(request)
    desc = state.describe(model)
    chosen = state.resolve_backend(desc, backend)
    set_backend_label(request, chosen)
    kind = media_type(request)
    started = time.perf_counter()
    if kind == "multipart/form-data":
        images, names = await _images_from_multipart(request)
    elif kind.startswith("image/") or kind in _RAW_TYPES:
        images, names = [await read_body(request)], [""]
    else:
        raise UnsupportedMediaTypeError(
            f"Content-Type {kind or '(none)'!r} is not supported; send multipart/form-data "
            f"with {IMAGE_FIELD!r} fields, or the raw image as image/* or "
            "application/octet-stream"
        )
    state.observe_stage(desc.name, chosen, "receive", time.perf_counter() - started)
    deadline = state.deadline()
    probabilities = await unless_disconnected(
        request, state.classify_images(desc, chosen, images, deadline)
    )
    results = []
    for name, best in zip(names, top_k(probabilities, top_k_), strict=True):
        predictions = [
            {"label": desc.labels[i] if i < len(desc.labels) else str(i), "index": i, "score": s}
            for i, s in best
        ]
        entry: dict[str, Any] = {"predictions": predictions}
        if name:
            entry["filename"] = name
        results.append(entry)
    return {"model": desc.name, "backend": chosen, "results": results}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every served model with its layers, their sparsity, backends and measured speedups."""
    state = get_state(request)
    return {"models": [model_card(desc, state.ready) for desc in state.models.values()]}


@router.get("/models/{model}")
async def get_model(request: Request, model: str) -> dict[str, Any]:
    state = get_state(request)
    return model_card(state.describe(model), state.ready)
