"""The index routes, with `blip2 serve --index PATH`: POST /v1/search, GET /v1/thumbnail; and GET /v1/info.

A search runs on the match model's worker (it embeds the query with that model), never merged with another
request. The index must have been made with the served match model: otherwise its scores would be
meaningless, and the request is a 409 naming both. A thumbnail is served only for a path that is a row of
the index, compared as stored (so no path the client makes up, `..` or not, is ever opened), its bytes read
again as the row locates them (an image file; a tar member or table cell inside its recorded source, checked
against the stored hash: see `blip2.index.locating`), decoded by the allow-listed decoder and resized to at
most 256 px; anything else is a 404.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import Blip2Error, IndexMismatchError
from ..index.index import Index
from ..index.locating import read_row
from ..index.store import Row, Where
from .errors import ServiceError, invalid
from .schemas import Body
from .settings import Settings
from .tasks import SearchCall

THUMBNAIL_PX = 256  # the longest side of a thumbnail
THUMBNAIL_QUALITY = 85


class SearchRequest(Body):
    text: str | None = Field(None, description="A text query.")
    image: str | None = Field(
        None, description="An image query: base64 or a data: URI, or a file part `image`."
    )
    k: int | None = Field(None, description="How many hits (default 10).")
    rerank: bool | None = Field(None, description="Re-rank the top rerank_k by the ITM head (text only).")
    rerank_k: int | None = None
    where_caption: str | None = Field(None, description="Only images whose caption contains this text.")
    where_path: str | None = Field(None, description="Only images whose path matches this glob.")


class SearchHit(BaseModel):
    rank: int
    image: str = Field(
        description="The image's path as stored in the index (SOURCE#KEY for one inside a shard or table)."
    )
    source: str | None = Field(None, description="The tar shard or table the image is in, if any.")
    key: str | None = Field(None, description="Its key in that shard or table.")
    score: float = Field(description="ITC score.")
    match: float | None = Field(None, description="ITM probability, when re-ranked.")
    error: str | None = Field(None, description="Why the image could not be re-read for re-ranking.")
    thumbnail: str = Field(description="Its thumbnail's URL on this server: /v1/thumbnail?path=...")


class SearchResponse(BaseModel):
    hits: list[SearchHit] = Field(description="Best first.")


class SearchIndex:
    """The served index and the lock that keeps its reader to one thread at a time (searches run on the
    match model's worker, thumbnail look-ups in the thread pool)."""

    def __init__(self, path: str | Path):
        self.index = Index(path, resident=True)  # a long-lived searcher: its vectors kept in memory
        self._lock = threading.Lock()
        self.index.meta()  # an IndexFileError now, at startup, when `path` is not an index

    def search(self, model: Any, query: dict[str, Any]) -> list[dict]:
        with self._lock:
            self.index.model = model
            hits = self.index.search(**query)
        return [{**hit.to_dict(), "thumbnail": thumbnail_url(hit.image)} for hit in hits]

    def row(self, path: str) -> Row | None:
        """The row stored at `path`, or None."""
        with self._lock:
            return self.index._store().get(path)

    def info(self) -> dict[str, Any]:
        with self._lock:
            info = self.index.info()
        return {name: info[name] for name in ("count", "model", "num_query", "dim", "ann")}


def query_of(body: SearchRequest, image: Any) -> dict[str, Any]:
    """The keyword arguments of `Index.search` for a request (its decoded image query, if any)."""
    where = None
    if body.where_caption is not None or body.where_path is not None:
        where = Where(caption=body.where_caption, path=body.where_path)
    given = body.given("text", "k", "rerank", "rerank_k")
    return {**given, **({} if image is None else {"image": image}), "where": where}


def thumbnail_url(path: str) -> str:
    """The hit's thumbnail on this server (a path on the same origin, for the web page's <img>)."""
    return "/v1/thumbnail?path=" + quote(path, safe="")


def check_texts(body: SearchRequest, settings: Settings) -> None:
    for name in ("text", "where_caption", "where_path"):
        value = getattr(body, name)
        if value is not None and len(value) > settings.max_prompt_chars:
            raise invalid(
                f"{name}: {len(value)} characters, more than the limit of {settings.max_prompt_chars} "
                "(max_prompt_chars)"
            )


def thumbnail(row: Row, max_pixels: int) -> bytes:
    """The image of `row` as a JPEG at most THUMBNAIL_PX on its longest side; a 404 when it cannot be read
    (removed or changed since it was indexed)."""
    from ..images import load_image

    try:
        image = load_image(read_row(row), max_pixels=max_pixels)
    except Blip2Error:
        raise not_found() from None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def not_found() -> ServiceError:
    return ServiceError(404, "not_found", "no such image in the index")


def no_index() -> ServiceError:
    return ServiceError(404, "no_index", "the server has no index: start it with blip2 serve --index PATH")


def add_routes(app: FastAPI, index: SearchIndex | None) -> None:
    """POST /v1/search and GET /v1/thumbnail (404 without an index)."""
    from .app import (
        ERROR_RESPONSES,
        authorize,
        decode_images,
        image_sources,
        parse_request,
        request_body,
        with_timeout,
    )

    service = app.state.service
    settings: Settings = service.settings

    @app.post(
        "/v1/search",
        summary="Search the index by text or image",
        response_model=None,
        responses={
            200: {"model": SearchResponse},
            404: {"description": "No index"},
            409: {"description": "Index of another checkpoint"},
            **ERROR_RESPONSES,
        },
        openapi_extra={"requestBody": request_body(SearchRequest)},
    )
    async def search(request: Request) -> Response:
        authorize(request, settings)
        if index is None:
            raise no_index()
        model = service.model_for("search")

        async def handle() -> Response:
            body, uploads = await parse_request(request, SearchRequest, settings)
            check_texts(body, settings)
            sources = image_sources(body, uploads)
            if len(sources) > 1:
                raise invalid("image: search takes one image")
            images = await decode_images(sources, model, settings)
            try:
                query = query_of(body, images[0] if images else None)
                result = await service.run("search", SearchCall(index, query))
            except IndexMismatchError as e:
                raise ServiceError(409, "index_mismatch", str(e)) from None
            return JSONResponse(result)

        return await with_timeout(handle(), settings)

    @app.get("/v1/thumbnail", summary="A thumbnail of an indexed image (≤ 256 px JPEG)", response_model=None)
    async def thumbnail_route(request: Request, path: str) -> Response:
        authorize(request, settings)
        if index is None:
            raise no_index()
        stored = await run_in_threadpool(index.row, path)
        if stored is None:
            raise not_found()
        data = await run_in_threadpool(thumbnail, stored, settings.max_pixels)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})
