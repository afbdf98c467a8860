"""/docs (Swagger UI) and /redoc served from the service itself, with no CDN.

FastAPI's own pages load swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js from
jsdelivr, so in an air-gapped cluster they render blank. The `fastapi-offline` package ships
those files; this router serves them from fixed routes (not a StaticFiles mount, so that
nothing else in the package folder is reachable) and builds the two pages with FastAPI's own
helpers pointing at them. The app must be created with docs_url=None and redoc_url=None.

These are not inference routes: no API key is asked for, like /openapi.json itself.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs-assets"

# name -> media type. Only these files are served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# The files change only with the package version, so browsers may keep them a day.
CACHE_CONTROL = "public, max-age=86400"

router = APIRouter(include_in_schema=False)


def asset_folder() -> Path:
    """Where fastapi-offline keeps the files (inside site-packages, so also in the images)."""
    return Path(str(files("fastapi_offline") / "static"))


def _prefix(request: Request) -> str:
    # Behind a proxy that strips a path prefix, the pages must link through that prefix.
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _prefix(request), request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_URL)
async def redoc(request: Request) -> HTMLResponse:
    root, app = _prefix(request), request.app
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,  # fonts.googleapis.com is a CDN too
    )


def _asset_route(name: str, media_type: str) -> None:
    async def asset() -> FileResponse:
        return FileResponse(
            asset_folder() / name, media_type=media_type, headers={"Cache-Control": CACHE_CONTROL}
        )

    router.add_api_route(f"{ASSETS_URL}/{name}", asset, methods=["GET"], name=f"docs-{name}")


for _name, _media_type in ASSETS.items():
    _asset_route(_name, _media_type)
