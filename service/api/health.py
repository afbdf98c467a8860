"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import get_state

router = APIRouter(tags=["health"])


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    """200 while the process serves HTTP at all."""
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    """200 once every model is loaded and warmed; 503 before that and while draining."""
    reason = get_state(request).not_ready_reason()
    if reason is None:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": reason}, status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    content, content_type = get_state(request).metrics.render()
    return Response(content, media_type=content_type)
