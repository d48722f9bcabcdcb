"""The web page at `/`: pick, drop or paste an image, read its caption, ask about it, score labels, search.

Three static files (static/index.html, app.js, style.css) with no framework, no build step and nothing
fetched from elsewhere, so the page works offline. They are read once, at mount time, and answered from
memory with an explicit content type and a Content-Security-Policy that allows only this origin (no inline
script, no other host); images the user picks are shown from `blob:` URLs and search thumbnails may be
`data:` URIs. `GET /web/config` tells the page what it cannot detect by itself: whether an API key is
needed. Everything else it learns from the API (a 400 "unsupported" from /v1/classify: no matching model;
a 404 from /v1/search: no index).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from .settings import Settings

# Only this origin; `blob:` for the preview of the picked image, `data:` for thumbnails sent inline.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def read_static() -> dict[str, bytes]:
    """The page's files, by name, from the installed package (they ship as package data)."""
    folder = resources.files("blip2.server") / "static"
    return {name: (folder / name).read_bytes() for name in MEDIA_TYPES}


def mount_web(app: FastAPI, settings: Settings) -> None:
    """Serve the page at `/`, its files at `/static/{name}` and its settings at `/web/config`."""
    files = read_static()

    def page(name: str) -> Response:
        return Response(files[name], media_type=MEDIA_TYPES[name], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return page("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files or name == "index.html":
            raise HTTPException(404, f"no static file {name!r}")
        return page(name)

    @app.get("/web/config", include_in_schema=False)
    async def config() -> Response:
        return JSONResponse({"api_key_required": settings.api_key is not None}, headers=HEADERS)
