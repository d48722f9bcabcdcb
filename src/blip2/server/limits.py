"""Request bodies read and checked against the service's limits before any model work.

The body is read up to `max_upload_bytes` and no further (413); it is JSON, or multipart/form-data whose
file parts are the images and whose other parts are the fields (a list field repeated). Fields are
validated by the request's schema (422 naming the field), then against the limits: list lengths
(`max_inputs`, 413), text lengths (`max_prompt_chars`, 422), `max_new_tokens` (422).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from ..tasks.captioning import TASK_DEFAULTS
from .errors import ServiceError, invalid, too_large
from .settings import Settings

Model = TypeVar("Model", bound=BaseModel)

LIST_FIELDS = ("images", "questions", "texts", "labels")
TEXT_FIELDS = ("prompt", "template", "questions", "texts", "labels")
UPLOAD_FIELDS = ("images", "image")  # the multipart parts read as images

Uploads = list[tuple[str, bytes]]  # (field name, image bytes) of each file part, in order


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is longer than `limit` bytes: a declared length is
    checked before anything is read, and the stream is counted as it comes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(size: int, limit: int) -> ServiceError:
    return too_large(f"the request body is {size}+ bytes, more than the limit of {limit} (max_upload_bytes)")


async def parse_body(request: Request, settings: Settings) -> tuple[dict[str, Any], Uploads]:
    """The request's fields and its uploaded images: a JSON object, or a multipart form. 415 otherwise."""
    body = await read_body(request, settings.max_upload_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _parse_form(request, body, settings)
    if kind in ("application/json", ""):
        return _parse_json(body), []
    raise ServiceError(
        415,
        "unsupported_media_type",
        f"content type {kind!r} is not accepted: send application/json or multipart/form-data",
    )


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise invalid(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise invalid(f"the body must be a JSON object, not {type(data).__name__}")
    return data


async def _parse_form(request: Request, body: bytes, settings: Settings) -> tuple[dict[str, Any], Uploads]:
    """A multipart body (already read, within the limit) -> its fields and its file parts' bytes."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    fields: dict[str, Any] = {}
    uploads: Uploads = []
    part_limit = max(64 * 1024, 4 * settings.max_prompt_chars)  # one text field, in UTF-8
    form_request = Request(request.scope, receive)
    async with form_request.form(max_files=settings.max_inputs, max_part_size=part_limit) as form:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, []).append(value)
            elif name in UPLOAD_FIELDS:
                uploads.append((name, await value.read()))
            else:
                raise invalid(f"{name}: a file part, where only {' or '.join(UPLOAD_FIELDS)} may be files")
    return {name: _form_value(name, values) for name, values in fields.items()}, uploads


def _form_value(name: str, values: list[str]) -> Any:
    if name in LIST_FIELDS:
        return values
    if len(values) > 1:
        raise invalid(f"{name}: given {len(values)} times, expected once")
    return values[0]


def validate(schema: type[Model], data: dict[str, Any]) -> Model:
    """`data` as a `schema` instance; a 422 naming the first field at fault (and how many are)."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise invalid(describe(e.errors())) from None


def describe(errors: list) -> str:
    """pydantic's / FastAPI's error list -> "field[0]: message (and 2 more errors)"."""
    first = errors[0]
    where = field_path([part for part in first["loc"] if part != "body"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'body'}: {first['msg']}{more}"


def field_path(loc: list) -> str:
    """("questions", 2) -> "questions[2]"; union branches pydantic names (e.g. "list[str]") are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not any(c in str(part) for c in "[]-"):  # a field name, not a branch like "list[str]"
            path += f".{part}" if path else str(part)
    return path


def check_request(request: BaseModel, uploads: int, settings: Settings) -> None:
    """The limits on a validated request: list lengths, text lengths, max_new_tokens."""
    for name in LIST_FIELDS:
        value = getattr(request, name, None)
        count = (len(value) if isinstance(value, list) else 0) + (uploads if name == "images" else 0)
        if count > settings.max_inputs:
            raise too_large(
                f"{name}: {count} given, more than the limit of {settings.max_inputs} (max_inputs)"
            )
    for name in TEXT_FIELDS:
        value = getattr(request, name, None)
        texts = [(name, value)] if isinstance(value, str) else [(f"{name}[{i}]", t) for i, t in _items(value)]
        for field, text in texts:
            if len(text) > settings.max_prompt_chars:
                raise invalid(
                    f"{field}: {len(text)} characters, more than the limit of {settings.max_prompt_chars} "
                    "(max_prompt_chars)"
                )
    asked = getattr(request, "max_new_tokens", None)
    if asked is not None and asked > settings.max_new_tokens:
        raise invalid(f"max_new_tokens: {asked} is more than the limit of {settings.max_new_tokens}")


def _items(value: Any) -> list[tuple[int, str]]:
    return list(enumerate(value)) if isinstance(value, list) else []


def generation_options(task: str, options: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The options a caption / ask request runs with: its own, and max_new_tokens lowered to the limit when
    the task's default is above it (a request that asks for more is refused by `check_request`)."""
    default = TASK_DEFAULTS[task]["max_new_tokens"]
    if "max_new_tokens" not in options and default > settings.max_new_tokens:
        return {**options, "max_new_tokens": settings.max_new_tokens}
    return options
