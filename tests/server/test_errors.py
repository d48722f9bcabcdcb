"""Every limit and error path answers `{"error": {"type", "message"}}` with its status, naming the problem;
no traceback reaches a client."""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pytest
from PIL import Image
from service_helpers import b64

from blip2.errors import InputError


def _error(response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind, body
    return body["error"]["message"]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_too_large_bodies_pixels_and_lists_are_413(serve, photos):
    client = serve(max_upload_bytes=2000, max_pixels=64 * 64, max_inputs=2)
    big = {"images": ["A" * 3000]}
    assert "max_upload_bytes" in _error(client.post("/v1/caption", json=big), 413, "too_large")
    files = [("images", ("a.jpg", photos[0].read_bytes()))]
    assert "limit of 2000" in _error(client.post("/v1/caption", files=files), 413, "too_large")
    message = _error(client.post("/v1/caption", json={"images": [b64_bytes(_png(65, 64))]}), 413, "too_large")
    assert message.startswith("images[0]: the image has 4160 pixels")
    small = b64_bytes(_png(8, 8))
    message = _error(client.post("/v1/caption", json={"images": [small] * 3}), 413, "too_large")
    assert "images: 3 given" in message
    assert client.post("/v1/caption", json={"images": [small] * 2, "max_new_tokens": 2}).status_code == 200


def b64_bytes(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_bad_fields_are_422_naming_the_field(serve, photos):
    client = serve(max_prompt_chars=20, max_new_tokens=12)
    image = b64(photos[0])
    cases = [
        ({"images": [image], "max_new_tokens": 13}, "max_new_tokens: 13 is more than the limit of 12"),
        ({"images": [image], "num_beams": "many"}, "num_beams: "),
        ({"images": [image], "beams": 2}, "beams: Extra inputs are not permitted"),
        ({"images": [image], "prompt": "x" * 21}, "prompt: 21 characters, more than the limit of 20"),
        (
            {"images": [image], "temperature": 0.0, "do_sample": True},
            "invalid generation options: temperature must be > 0",
        ),
        ({"images": []}, "images: give at least one image"),
        ({"images": ["https://example.com/cat.jpg"]}, "images[0]: URLs are not fetched"),
        ({"images": ["data:image/png,rawbytes"]}, "images[0]: a data: URI must be base64"),
        ({"images": [image, "%%%"]}, "images[1]: not valid base64"),
        ({"images": [b64_bytes(b"GIF89a-not-really")]}, "images[0]: "),
    ]
    for body, expected in cases:
        response = client.post("/v1/caption", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["message"].startswith(expected), (body, response.text)
    message = _error(
        client.post("/v1/ask", json={"images": [image], "questions": ["ok", "y" * 21]}),
        422,
        "invalid_request",
    )
    assert message.startswith("questions[1]: 21 characters")
    message = _error(
        client.post("/v1/ask", json={"images": [image] * 2, "questions": ["a", "b", "c"]}),
        422,
        "invalid_request",
    )
    assert "2 images and 3 questions" in message
    assert _error(
        client.post("/v1/caption", content=b"{nope", headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    ).startswith("the body is not valid JSON")
    assert "JSON object" in _error(client.post("/v1/caption", json=[1, 2]), 422, "invalid_request")
    _error(
        client.post("/v1/caption", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    _error(client.post("/v1/classify", json={"labels": ["a"]}), 422, "invalid_request")


def test_task_errors_map_to_4xx_with_their_message(serve, photos):
    client = serve(match=False)
    message = _error(
        client.post("/v1/match", json={"images": [b64(photos[0])], "texts": ["a"]}), 400, "unsupported"
    )
    assert "retrieval checkpoint" in message
    long = " ".join(["word"] * 300)  # within the character limit, not the tiny model's 128 positions
    message = _error(
        client.post("/v1/caption", json={"images": [b64(photos[0])], "prompt": long}), 422, "invalid_request"
    )
    assert message.startswith("input 0: the prompt is")


def test_api_key(serve, photos):
    client = serve(api_key="s3cret")
    body = {"images": [b64(photos[0])], "max_new_tokens": 2}
    response = client.post("/v1/caption", json=body)
    _error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    _error(
        client.post("/v1/caption", json=body, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized"
    )
    assert (
        client.post("/v1/caption", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    )
    assert client.post("/v1/caption", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_unexpected_errors_are_a_bare_500_logged_server_side(serve, photos, caplog):
    client = serve()

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals /etc/passwd")

    client.service.models.model.caption = broken
    with caplog.at_level(logging.ERROR, logger="blip2.server"):
        response = client.post("/v1/caption", json={"images": [b64(photos[0])]})
    message = _error(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text and "server log" in message
    assert any("secret internals" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_queue_full_is_503_with_retry_after_and_timeout_is_504(serve, photos):
    client = serve(max_queue=1, max_batch=1, max_wait_ms=0, request_timeout_s=2.0)
    release = threading.Event()
    started = threading.Event()
    model = client.service.models.model
    real = model.caption

    def blocking(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    model.caption = blocking
    body = {"images": [b64(photos[0])], "max_new_tokens": 2}
    results = {}

    def call(name, payload):
        results[name] = client.post("/v1/caption", json=payload)

    first = threading.Thread(target=call, args=("first", body))
    first.start()
    assert started.wait(10)  # the worker is busy with the first request
    second = threading.Thread(target=call, args=("second", {**body, "max_new_tokens": 3}))
    second.start()
    while client.service._batchers[id(model)].depth() < 1:
        pass  # the second request is queued
    third = client.post("/v1/caption", json=body)
    assert "busy" in _error(third, 503, "overloaded")
    assert third.headers["retry-after"] == "1"
    first.join(15)
    second.join(15)
    release.set()
    _error(results["first"], 504, "timeout")  # the worker was held past the request timeout
    _error(results["second"], 504, "timeout")


def test_readyz_is_503_until_the_models_are_loaded(checkpoints, photos):
    from fastapi.testclient import TestClient

    import blip2
    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    loaded = threading.Event()

    def loader():
        loaded.wait(30)
        return Models(blip2.load(checkpoints["opt"], device="cpu"))

    with TestClient(create_app(Settings(), loader)) as client:
        _error(client.get("/readyz"), 503, "not_ready")
        response = client.post("/v1/caption", json={"images": [b64(photos[0])]})
        _error(response, 503, "not_ready")
        assert response.headers["retry-after"] == "5"
        assert client.get("/healthz").status_code == 200
        loaded.set()
        for _ in range(1000):
            if client.get("/readyz").status_code == 200:
                break
            loaded.wait(0.01)
        assert client.get("/readyz").json() == {"status": "ready"}


def test_a_failed_load_is_reported(checkpoints):
    from fastapi.testclient import TestClient

    from blip2.server.app import create_app
    from blip2.server.settings import Settings

    failures = []
    done = threading.Event()

    def loader():
        raise InputError("no such checkpoint")

    app = create_app(Settings(), loader)
    app.state.service.on_load_error = lambda e: (failures.append(e), done.set())
    with TestClient(app) as client:
        assert done.wait(10)
        assert "failed to load" in _error(client.get("/readyz"), 503, "not_ready")
    assert str(failures[0]) == "no such checkpoint"


@pytest.mark.parametrize("value", [0, -1])
def test_settings_are_checked(value):
    from blip2.server.settings import Settings

    with pytest.raises(InputError, match="max_batch"):
        Settings(max_batch=value)


def test_fastapi_validation_errors_have_our_shape(checkpoints):
    """Routes that let FastAPI validate their parameters (the next ones may) answer in our shape too."""
    from fastapi.testclient import TestClient

    import blip2
    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    app = create_app(Settings(), Models(blip2.load(checkpoints["opt"], device="cpu")))

    @app.get("/probe")
    async def probe(count: int) -> dict:
        return {"count": count}

    with TestClient(app) as client:
        assert client.get("/probe?count=3").json() == {"count": 3}
        message = _error(client.get("/probe?count=three"), 422, "invalid_request")
        assert message.startswith("query.count: ")
