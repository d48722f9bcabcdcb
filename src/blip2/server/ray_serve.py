"""The service as a Ray Serve deployment (`blip2 serve --engine ray`): the same FastAPI application as the
local server (`create_app`), one copy per replica, behind Ray Serve's HTTP proxy.

Each replica loads its own models (one replica per GPU when the cluster has GPUs: Ray sets the replica's
CUDA_VISIBLE_DEVICES, so "cuda" is its own GPU), so the in-replica batcher and image cache work unchanged;
the proxy spreads requests across replicas. Every response carries `X-Blip2-Replica`, the id of the replica
that answered. Ray is imported only here, when the engine runs (`pip install 'blip2[ray]'`).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from ..errors import Blip2Error
from .service import Loader
from .settings import Settings

REPLICA_HEADER = "X-Blip2-Replica"
APP_NAME = "blip2"
# Serve stops routing to a replica and waits this long beyond the request timeout before killing it.
SHUTDOWN_GRACE_S = 5.0


def import_ray() -> tuple[Any, Any]:
    """(ray, ray.serve); an ImportError saying which extra to install when Ray is missing."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(
            f"blip2 serve --engine ray needs Ray Serve: pip install 'blip2[ray]' ({e})"
        ) from None
    return ray, serve


def build_app(settings: Settings, load: Loader):
    """Run in each replica at start: its models loaded (before the replica takes traffic, so Serve routes
    only to loaded replicas), the service's app around them, and the replica header."""
    from ray import serve

    from .app import create_app

    app = create_app(settings, load())
    app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
    return app


class ReplicaHeader:
    """ASGI middleware: `X-Blip2-Replica: <replica id>` on every HTTP response (streamed ones included)."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


def deployment(settings: Settings, load: Loader, replicas: int, gpus_per_replica: float):
    """The bound Serve application: `replicas` copies of the app, each with `gpus_per_replica` GPUs."""
    _, serve = import_ray()

    def build():  # Serve takes a plain function (not a partial) for an app built in the replica
        return build_app(settings, load)

    ingress = serve.ingress(build)
    options: dict[str, Any] = {"num_gpus": gpus_per_replica} if gpus_per_replica > 0 else {}
    return serve.deployment(
        ingress(type("Blip2Service", (), {})),
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options=options,
        # the app queues, batches and answers 503 itself: let Serve hand a replica a full queue's worth
        max_ongoing_requests=settings.max_queue + settings.max_batch,
        graceful_shutdown_timeout_s=settings.request_timeout_s + SHUTDOWN_GRACE_S,
    ).bind()


def plan(gpus_in_cluster: float, replicas: int | None, gpus_per_replica: float | None) -> tuple[int, float]:
    """(replicas, GPUs per replica): by default one replica per GPU of the cluster, or one CPU replica."""
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if gpus_in_cluster >= 1 else 0.0
    if replicas is None:
        replicas = max(1, int(gpus_in_cluster // gpus_per_replica)) if gpus_per_replica > 0 else 1
    return replicas, gpus_per_replica


def connect() -> None:
    """Connect to the Ray cluster at RAY_ADDRESS, or start a local one. Replica logs (with any traceback)
    stay in Ray's log folder rather than on this terminal."""
    ray, _ = import_ray()
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True, log_to_driver=False)


def start(settings: Settings, load: Loader, replicas: int | None, gpus_per_replica: float | None) -> int:
    """Deploy the service on the connected Ray cluster with its HTTP proxy on the settings' host and port;
    the number of replicas, once all are loaded. A `Blip2Error` naming the cause when a replica fails."""
    ray, serve = import_ray()
    replicas, gpus_per_replica = plan(ray.cluster_resources().get("GPU", 0.0), replicas, gpus_per_replica)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(deployment(settings, load, replicas, gpus_per_replica), name=APP_NAME, route_prefix="/")
    except RuntimeError:
        raise Blip2Error(
            f"the Ray Serve deployment did not start: {_deployment_error(serve)} "
            "(replica logs: /tmp/ray/session_latest/logs/serve/ on the replica's node)"
        ) from None
    return replicas


def _deployment_error(serve: Any) -> str:
    """The last line of the deployment's status message: a replica's exception, e.g. a checkpoint error."""
    status = serve.status().applications[APP_NAME]
    message = status.deployments[APP_NAME].message if APP_NAME in status.deployments else status.message
    lines = [line for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def run(settings: Settings, load: Loader, replicas: int | None, gpus_per_replica: float | None) -> None:
    """`connect`, `start`, then serve until SIGTERM or Ctrl-C; then Serve drains the replicas: on a cluster of its own
    it shuts down, on a shared one (RAY_ADDRESS) only this application is deleted."""
    _, serve = import_ray()
    connect()
    stop = threading.Event()
    # after ray.init, which installs a SIGTERM handler of its own that aborts the process
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        start(settings, load, replicas, gpus_per_replica)
        stop.wait()
    finally:  # Ctrl-C too, then blip2's main reports it
        signal.signal(signal.SIGTERM, previous)
        if os.environ.get("RAY_ADDRESS"):
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
