"""The model repository extension, as Triton defines it and tritonclient calls it:
`POST /v2/repository/index`, `POST /v2/repository/models/{m}/load` and `/unload`.

Off unless ESCORT_REPOSITORY_API is set (403), behind the API key when one is set, and a model
name is a manifest's file name in the models folders, never a path. A load builds the model
beside the served ones (they keep serving); an unload stops admitting its requests at once
(404) and lets the queued ones finish first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import get_state, read_body, require_api_key
from service.errors import BadInputError, SchemaError

router = APIRouter(prefix="/v2/repository", tags=["repository"],
                   dependencies=[Depends(require_api_key)])  # fmt: skip

# Load parameters Triton defines that this server does not take (a config or files sent along).
_UNSUPPORTED = ("config",)


async def _body(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadInputError("the body is not JSON; send {} or leave it empty") from None
    if not isinstance(body, dict):
        raise SchemaError("the body must be a JSON object")
    return body


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise SchemaError("`parameters` must be an object")
    check_load_parameters(params)
    return params


def check_load_parameters(names: Iterable[str]) -> None:
    """Refuse what Triton's load may carry and this server does not take (REST and gRPC)."""
    for key in names:
        if key in _UNSUPPORTED or key.startswith("file:"):
            raise BadInputError(
                f"load parameter {key!r} is not supported: models come from manifests in the "
                "models folders (ESCORT_MODELS_DIR)"
            )


@router.post("/index")
async def repository_index(request: Request) -> JSONResponse:
    body = await _body(request)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise SchemaError("`ready` must be true or false")
    return JSONResponse(get_state(request).repository_index(ready_only=ready))


@router.post("/models/{model}/load")
async def load_model(request: Request, model: str) -> Response:
    _parameters(await _body(request))
    await get_state(request).load_model(model)
    return Response(status_code=200)


@router.post("/models/{model}/unload")
async def unload_model(request: Request, model: str) -> Response:
    _parameters(await _body(request))  # unload_dependents: there are no dependents here
    await get_state(request).unload_model(model)
    return Response(status_code=200)
