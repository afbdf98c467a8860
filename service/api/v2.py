"""KServe V2 (Open Inference Protocol) routes: server and model metadata, model readiness,
configuration and statistics as Triton serves them, and infer (JSON and binary tensors).

A model may be served in several versions (manifests `<model>@<N>.toml`); a route without
`/versions/{v}` takes the latest one served.
"""

from __future__ import annotations

import contextlib
import functools
import time
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    get_state,
    media_type,
    read_body,
    require_api_key,
    set_backend_label,
    unless_disconnected,
)
from service.api.v2_codec import (
    IMAGE_INPUT,
    OUTPUT,
    TENSOR_INPUT,
    encode_infer_response,
    parse_infer_request,
    split_body,
)
from service.engine.protocol import ModelDescription
from service.errors import NotReadyError, UnsupportedMediaTypeError

router = APIRouter(prefix="/v2", tags=["v2"])

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
_BODY_TYPES = ("", "application/json", "application/octet-stream")
_PARSE_INLINE_BYTES = 256 * 1024


def server_version() -> str:
    try:
        return metadata.version("escort-serve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def model_metadata(desc: ModelDescription, versions: list[str]) -> dict[str, Any]:
    """V2 model metadata; `versions`: every served version of the model."""
    channels, height, width = desc.input_shape
    prep = desc.preprocessing
    return {
        "name": desc.model_name,
        "versions": versions,
        "platform": "escort",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, channels, height, width]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, desc.num_classes]}],
        # Not in the V2 schema (clients ignore extra fields): how to prepare `input` yourself.
        "parameters": {
            "preprocessing": {
                "color": "RGB",
                "layout": "NCHW",
                "resize_short_side": prep.resize,
                "center_crop": prep.crop,
                "mean": list(prep.mean),
                "std": list(prep.std),
                "formula": "(pixel_0_255 - mean) / std",
            },
            "backends": list(desc.backends),
            "max_batch_size": desc.max_batch_size,
            "input_datatypes": ["FP32", "FP16"],
        },
    }


def model_config(
    desc: ModelDescription, max_batch_size: int, max_batch_delay_ms: float
) -> dict[str, Any]:
    """The model as a Triton model configuration, for clients (perf_analyzer) that read it."""
    channels, height, width = desc.input_shape
    return {
        "name": desc.model_name,
        "platform": "escort",
        "backend": "escort",
        "max_batch_size": max_batch_size,
        "input": [
            {
                "name": IMAGE_INPUT,
                "data_type": "TYPE_STRING",
                "dims": [1],
                "reshape": {"shape": []},
                "optional": True,
            },
            {
                "name": TENSOR_INPUT,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [channels, height, width],
                "optional": True,
            },
        ],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [desc.num_classes]}],
        "dynamic_batching": {"max_queue_delay_microseconds": round(max_batch_delay_ms * 1000)},
        "version_policy": {"latest": {"num_versions": 1}},
    }


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "escort-serve", "version": server_version(), "extensions": EXTENSIONS}


@router.get("/models/stats")
async def get_all_stats(request: Request) -> dict[str, Any]:
    state = get_state(request)
    return {"model_stats": [await state.statistics(desc) for desc in state.models.values()]}


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def get_model_metadata(
    request: Request, model: str, version: str | None = None
) -> dict[str, Any]:
    state = get_state(request)
    desc = state.describe(model, version)
    return model_metadata(desc, [d.version for d in state.versions(desc.model_name)])


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def get_model_ready(request: Request, model: str, version: str | None = None) -> Response:
    state = get_state(request)
    with contextlib.suppress(NotReadyError):  # still loading: answer "not ready" below
        state.describe(model, version)
    reason = state.not_ready_reason()
    if reason is None:
        return JSONResponse({"name": model, "ready": True})
    return JSONResponse({"name": model, "ready": False, "error": reason}, status_code=503)


@router.get("/models/{model}/config")
@router.get("/models/{model}/versions/{version}/config")
async def get_model_config(request: Request, model: str, version: str | None = None):
    state = get_state(request)
    settings = state.settings
    desc = state.describe(model, version)
    return model_config(desc, settings.max_batch_size, settings.max_batch_delay_ms)


@router.get("/models/{model}/stats")
@router.get("/models/{model}/versions/{version}/stats")
async def get_model_stats(request: Request, model: str, version: str | None = None):
    state = get_state(request)
    return {"model_stats": [await state.statistics(state.describe(model, version))]}


@router.post("/models/{model}/infer", dependencies=[Depends(require_api_key)])
@router.post("/models/{model}/versions/{version}/infer", dependencies=[Depends(require_api_key)])
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    state = get_state(request)
    desc = state.describe(model, version)
    if media_type(request) not in _BODY_TYPES:
        raise UnsupportedMediaTypeError(
            f"Content-Type {media_type(request)!r} is not supported here; send "
            "application/json, or application/octet-stream with Inference-Header-Content-Length"
        )
    started = time.perf_counter()
    body = await read_body(request)
    received = time.perf_counter()
    header, binary = split_body(body, request.headers.get("inference-header-content-length"))
    parse = functools.partial(
        parse_infer_request, header, binary, desc.input_shape, state.settings.max_images_per_request
    )
    # Large JSON is decoded in a thread, so that the event loop goes on answering (health
    # probes above all) meanwhile: the decoder and numpy's number parser leave the GIL free
    # most of the time. Small JSON, and binary tensors beside it, are decoded in place,
    # quicker than the hand-off.
    parsed = await run_in_threadpool(parse) if len(header) > _PARSE_INLINE_BYTES else parse()
    del body, header, binary, parse  # the tensor is parsed out of them: free them now
    backend = state.resolve_backend(desc, parsed.backend)
    set_backend_label(request, backend)
    state.observe_stage(desc.name, backend, "receive", received - started)
    state.observe_stage(desc.name, backend, "parse", time.perf_counter() - received)
    deadline = state.deadline(parsed.timeout_s)
    if parsed.images is not None:
        work = state.classify_images(desc, backend, parsed.images, deadline)
    else:
        work = state.classify_tensor(desc, backend, parsed.tensor, deadline)  # type: ignore[arg-type]
    probabilities = await unless_disconnected(request, work)
    encoding = time.perf_counter()
    content, header_length = encode_infer_response(desc, parsed, probabilities, backend)
    state.observe_stage(desc.name, backend, "encode", time.perf_counter() - encoding)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )
