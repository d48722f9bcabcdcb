"""The service on tiny checkpoints: a FastAPI TestClient factory, a live uvicorn on a free port for the
concurrent tests, and the same models loaded apart (never served) for the direct API calls they are
compared with."""

from __future__ import annotations

import contextlib

import pytest

import blip2

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def direct(checkpoints, retrieval_checkpoints):
    """The captioning and retrieval models, loaded for direct API calls only (no service touches them)."""
    return (
        blip2.load(checkpoints["opt"], device="cpu", dtype="float32"),
        blip2.load(retrieval_checkpoints["plain"], device="cpu", dtype="float32"),
    )


@pytest.fixture
def serve(checkpoints, retrieval_checkpoints):
    """serve(**settings) -> a started TestClient over freshly loaded models (its service: client.service)."""
    from fastapi.testclient import TestClient

    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    with contextlib.ExitStack() as stack:

        def start(match: bool = True, **settings):
            models = Models(
                blip2.load(checkpoints["opt"], device="cpu", dtype="float32"),
                blip2.load(retrieval_checkpoints["plain"], device="cpu", dtype="float32") if match else None,
            )
            app = create_app(Settings(**settings), models)
            client = stack.enter_context(TestClient(app, raise_server_exceptions=False))
            client.service = app.state.service
            return client

        yield start
