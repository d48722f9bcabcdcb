"""The FastAPI application: `create_app(settings, models)`.

Routes: POST /v1/caption, /v1/ask, /v1/match, /v1/similarity, /v1/embed, /v1/classify (the `Blip2` API's
tasks, its option names and defaults; `stream: true` on caption and ask, see streaming.py); POST /v1/search,
GET /v1/thumbnail (search.py); POST /v1/chat/completions (openai_api.py); GET /v1/info; GET /healthz
(alive), /readyz (models loaded), /metrics (Prometheus text), /openapi.json and /docs (an offline page, see
docs.py). Each task request is read and checked (limits.py), its images decoded in a thread (images.py),
and its call queued on the model's worker (service.py); every error is the JSON of errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import Blip2Error
from . import images as request_images
from . import schemas
from .docs import DOCS_HTML
from .errors import ServiceError, error_body, from_blip2_error, internal, invalid
from .limits import Uploads, check_request, describe, generation_options, parse_body, validate
from .metrics import Metrics
from .openai_api import add_routes as add_chat_routes
from .search import SearchIndex
from .search import add_routes as add_search_routes
from .service import Loader, Models, Service
from .settings import Settings
from .streaming import stream_task
from .tasks import AskCall, CaptionCall, ClassifyCall, EmbedCall, PairCall, check_pairs
from .web import mount_web

log = logging.getLogger("blip2.server")

Schema = TypeVar("Schema", bound=BaseModel)
Build = Callable[[Any, list, Settings], Any]  # (validated body, decoded images, settings) -> a task call


def create_app(settings: Settings, models: Models | Loader) -> FastAPI:
    """The service as an ASGI application. `models` is loaded `Models`, or a function that loads them: it
    then runs in a background thread at startup, and /readyz answers 503 until it is done."""
    service = Service(settings, models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:  # the server has drained its requests: run what is queued, stop the workers
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="blip2",
        version=__version__,
        description="BLIP-2 captions, answers, matching, embeddings and zero-shot labels over HTTP.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN: /docs is our own offline page instead
        redoc_url=None,
    )
    app.state.service = service
    _install_errors(app, service.metrics)
    app.add_middleware(Observe, metrics=service.metrics)
    _add_probes(app, service)
    mount_web(app, settings)
    for path, task, schema, response, build, summary in TASK_ROUTES:
        app.add_api_route(
            path,
            _task_endpoint(service, task, schema, build),
            methods=["POST"],
            summary=summary,
            response_model=None,
            responses={200: {"model": response}, **ERROR_RESPONSES},
            openapi_extra={"requestBody": request_body(schema)},
        )
    index = SearchIndex(settings.index) if settings.index is not None else None
    add_search_routes(app, index)
    add_chat_routes(app)
    _add_info(app, service, index)
    return app


# -- task endpoints -------------------------------------------------------------------------------------------
def _task_endpoint(service: Service, task: str, schema: type[BaseModel], build: Build):
    settings = service.settings

    async def handle(request: Request, model: Any) -> Response:
        body, uploads = await parse_request(request, schema, settings)
        images = await decode_images(image_sources(body, uploads), model, settings)
        call = build(body, images, settings)
        if getattr(body, "stream", None):
            return await stream_task(service, task, call, model)
        return JSONResponse(await service.run(task, call))

    async def endpoint(request: Request) -> Response:
        authorize(request, settings)
        model = service.model_for(task)  # 503 while loading, before the body is read
        return await with_timeout(handle(request, model), settings)

    endpoint.__name__ = task
    return endpoint


async def parse_request(request: Request, schema: type[Schema], settings: Settings) -> tuple[Schema, Uploads]:
    """The request's body read, validated by `schema` and checked against the limits; its file parts."""
    data, uploads = await parse_body(request, settings)
    body = validate(schema, data)
    check_request(body, len(uploads), settings)
    return body, uploads


async def decode_images(sources: list[tuple[str, bytes]], model: Any, settings: Settings) -> list:
    """The request's images decoded (in a thread) at `model`'s input size."""
    return await run_in_threadpool(_decode_all, sources, model.image_config, settings.max_pixels)


async def with_timeout(handling: Awaitable[Response], settings: Settings) -> Response:
    """`handling` within the request timeout, else a 504. The timeout covers reading the body, decoding and
    the queue; a call still queued when it runs out is cancelled (the worker skips it), one already running
    finishes unheard."""
    try:
        return await asyncio.wait_for(handling, settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise ServiceError(
            504, "timeout", f"no answer within the request timeout of {settings.request_timeout_s:g} s"
        ) from None


def authorize(request: Request, settings: Settings) -> None:
    """401 unless the request carries the API key (when one is set): `Authorization: Bearer <key>` or
    `X-API-Key: <key>`, compared in constant time."""
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise ServiceError(
            401,
            "unauthorized",
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )


def image_sources(body: Any, uploads: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """(field name, bytes) of each image of the request: its JSON strings or its file parts, not both."""
    if hasattr(body, "images"):
        texts = [(f"images[{i}]", text) for i, text in enumerate(body.images)]
    else:  # classify, search: one image
        texts = [] if body.image is None else [("image", body.image)]
    if texts and uploads:
        raise invalid("images: give them as JSON strings or as file parts, not both")
    if uploads:
        return [
            (f"{name}[{i}]" if name == "images" else name, data) for i, (name, data) in enumerate(uploads)
        ]
    return [(field, request_images.from_text(text, field)) for field, text in texts]


def _decode_all(sources: list[tuple[str, bytes]], config, max_pixels: int) -> list:
    return [request_images.decode(data, field, config, max_pixels) for field, data in sources]


def _some_images(images: list) -> list:
    if not images:
        raise invalid("images: give at least one image")
    return images


def _texts(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _caption(body: schemas.CaptionRequest, images: list, settings: Settings) -> CaptionCall:
    options = generation_options("caption", body.options(), settings)
    return CaptionCall(_some_images(images), body.prompt, options)


def _ask(body: schemas.AskRequest, images: list, settings: Settings) -> AskCall:
    questions = _texts(body.questions)
    check_pairs(len(_some_images(images)), questions, "questions")
    return AskCall(images, questions, body.template, generation_options("ask", body.options(), settings))


def _match(body: schemas.MatchRequest, images: list, settings: Settings) -> PairCall:
    texts = _texts(body.texts)
    check_pairs(len(_some_images(images)), texts, "texts")
    return PairCall(images, texts)


def _similarity(body: schemas.SimilarityRequest, images: list, settings: Settings) -> PairCall:
    return PairCall(_some_images(images), _texts(body.texts))


def _embed(body: schemas.EmbedRequest, images: list, settings: Settings) -> EmbedCall:
    texts = _texts(body.texts)
    if not images and not texts:
        raise invalid("give images, texts, or both to embed")
    return EmbedCall(images, texts)


def _classify(body: schemas.ClassifyRequest, images: list, settings: Settings) -> ClassifyCall:
    if len(images) != 1:
        raise invalid(f"image: classify takes exactly one image, got {len(images)}")
    return ClassifyCall(images[0], body.labels, body.given("template", "rerank", "top_k", "temperature"))


TASK_ROUTES: list[tuple[str, str, type[BaseModel], type[BaseModel], Build, str]] = [
    ("/v1/caption", "caption", schemas.CaptionRequest, schemas.CaptionResponse, _caption, "Caption images"),
    ("/v1/ask", "ask", schemas.AskRequest, schemas.AskResponse, _ask, "Answer questions about images"),
    ("/v1/match", "match", schemas.MatchRequest, schemas.MatchResponse, _match, "ITM match probabilities"),
    (
        "/v1/similarity",
        "similarity",
        schemas.SimilarityRequest,
        schemas.SimilarityResponse,
        _similarity,
        "ITC similarity of images and texts",
    ),
    ("/v1/embed", "embed", schemas.EmbedRequest, schemas.EmbedResponse, _embed, "Embed images and texts"),
    (
        "/v1/classify",
        "classify",
        schemas.ClassifyRequest,
        schemas.ClassifyResponse,
        _classify,
        "Zero-shot classification of one image",
    ),
]

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": text}
    for status, text in (
        (400, "The loaded checkpoint cannot do this task"),
        (401, "Missing or wrong API key"),
        (413, "Body, image pixels or list too large"),
        (415, "Neither JSON nor multipart/form-data"),
        (422, "A field is wrong (the message names it)"),
        (503, "Loading, or the queue is full (Retry-After)"),
        (504, "Request timeout"),
        (500, "Unexpected server error (no details: see the server log)"),
    )
}


def request_body(schema: type[BaseModel]) -> dict:
    """The OpenAPI request body of a task route: the schema as JSON, and as a multipart form whose image
    fields are file parts."""
    json_schema = schema.model_json_schema(ref_template="#/components/schemas/{model}")
    form = {**json_schema, "properties": dict(json_schema["properties"])}
    for name in ("images", "image"):
        if name in form["properties"]:
            binary = {"type": "string", "format": "binary"}
            form["properties"][name] = {"type": "array", "items": binary} if name == "images" else binary
    return {
        "required": True,
        "content": {"application/json": {"schema": json_schema}, "multipart/form-data": {"schema": form}},
    }


# -- probes, metrics, docs ------------------------------------------------------------------------------------
def _add_probes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The models are loaded (503 until then)")
    async def readyz() -> Response:
        if not service.ready:
            message = "loading the models" if service.load_error is None else "the models failed to load"
            return JSONResponse(error_body("not_ready", message), status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return HTMLResponse(DOCS_HTML)


def _add_info(app: FastAPI, service: Service, index: SearchIndex | None) -> None:
    @app.get("/v1/info", summary="The served models, the index and the tasks (for feature detection)")
    async def info(request: Request) -> Response:
        authorize(request, service.settings)
        models = service.models
        index_info = None if index is None else await run_in_threadpool(index.info)
        if models is None:
            return JSONResponse({"models": None, "index": index_info, "tasks": []})
        names = {"model": models.model.name, "match_model": getattr(models.match_model, "name", None)}
        return JSONResponse({"models": names, "index": index_info, "tasks": served_tasks(models, index)})


def served_tasks(models: Models, index: SearchIndex | None) -> list[str]:
    """The task routes the loaded checkpoints can answer: generation needs a language model, matching a
    retrieval checkpoint (no language model: the ITC / ITM heads), search an index too."""
    tasks = ["caption", "ask", "chat"] if models.model.config.text is not None else []
    if models.for_role("match").config.text is None:
        tasks += ["match", "similarity", "classify"] + (["search"] if index is not None else [])
    return tasks + ["embed"]


# -- errors and observation -----------------------------------------------------------------------------------
def route_label(scope: Scope) -> str:
    """The route template a request matched (bounded label values for the metrics), or "unmatched"."""
    return getattr(scope.get("route"), "path", "unmatched")


def _install_errors(app: FastAPI, metrics: Metrics) -> None:
    def respond(request: Request, error: ServiceError) -> Response:
        metrics.errors.inc(route=route_label(request.scope), type=error.type)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def service_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServiceError)
        return respond(request, error)

    async def blip2_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, Blip2Error)
        return respond(request, from_blip2_error(error))

    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return respond(request, invalid(describe(list(error.errors()))))

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        return respond(
            request, ServiceError(error.status_code, kind, str(error.detail), dict(error.headers or {}))
        )

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(Blip2Error, blip2_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)


class Observe:
    """ASGI middleware: counts each request by route and status, times it, and answers any exception that
    escaped the handlers with a bare JSON 500 (the traceback goes to the log only)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        except Exception as e:
            error = internal(e, f"{scope.get('method')} {scope.get('path')}")
            self.metrics.errors.inc(route=route_label(scope), type=error.type)
            if status == 0:  # nothing sent yet: answer; else the connection just ends
                status = error.status
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        finally:
            route = route_label(scope)
            self.metrics.requests.inc(route=route, status=str(status or 500))
            self.metrics.latency.observe(time.perf_counter() - started, route=route)
