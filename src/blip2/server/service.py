"""The running service: the loaded models, one batcher (and worker thread) per model, the image caches,
the metrics; `run` takes a task call from a request to its result."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .batching import Batcher, QueueFull
from .cache import install
from .errors import ServiceError
from .metrics import Metrics
from .settings import Settings
from .tasks import TASKS, execute

log = logging.getLogger("blip2.server")


@dataclasses.dataclass
class Models:
    """The checkpoints a service runs: `model` for caption and ask (and the rest when it is a retrieval
    checkpoint), `match_model` for match, similarity, classify and embed when given."""

    model: Any  # blip2.Blip2
    match_model: Any | None = None

    def for_role(self, role: str) -> Any:
        return self.match_model if role == "match" and self.match_model is not None else self.model


Loader = Callable[[], Models]


class Service:
    """Models (or a loader run in the background at `start`), the batchers in front of them, the metrics."""

    def __init__(self, settings: Settings, models: Models | Loader):
        self.settings = settings
        self.metrics = Metrics()
        self._source = models
        self.models: Models | None = None
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None  # e.g. stop the HTTP server
        self._batchers: dict[int, Batcher] = {}  # by id() of the model each owns

    @property
    def ready(self) -> bool:
        return self.models is not None

    def start(self) -> None:
        """Start the workers, after loading the models in a background thread when given a loader (the
        HTTP server answers /healthz and /readyz meanwhile)."""
        if isinstance(self._source, Models):
            self._install(self._source)
        else:
            threading.Thread(target=self._load, args=(self._source,), name="blip2-load", daemon=True).start()

    def _load(self, loader: Loader) -> None:
        started = time.monotonic()
        try:
            models = loader()
        except BaseException as e:
            self.load_error = e
            log.error("loading the models failed: %s", e)
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        self._install(models)
        log.info("models loaded in %.1f s: ready", time.monotonic() - started)

    def _install(self, models: Models) -> None:
        settings = self.settings
        for role, model in (("model", models.model), ("match_model", models.match_model)):
            if model is None or id(model) in self._batchers:
                continue
            if settings.image_cache > 0:
                install(model, settings.image_cache, self.metrics, role)
            batcher = Batcher(
                self._executor(model),
                settings.max_batch,
                settings.max_wait_ms / 1000,
                settings.max_queue,
                name=role,
            )
            self.metrics.queue_depth.track(batcher.depth, model=role)
            batcher.start()
            self._batchers[id(model)] = batcher
        self.models = models  # last: ready only once the workers run

    def _executor(self, model: Any) -> Callable[[str, list], list]:
        def run(task_name: str, calls: list) -> list:
            self.metrics.batch_size.observe(len(calls), task=task_name)
            self.metrics.model_calls.inc(task=task_name)
            return execute(model, TASKS[task_name], calls)

        return run

    def close(self) -> None:
        """Run what is queued, then stop the workers (after the HTTP server has drained its requests)."""
        for batcher in self._batchers.values():
            batcher.close()

    def model_for(self, task_name: str) -> Any:
        """The model a task runs on; 503 while the models load."""
        if self.models is None:
            raise ServiceError(503, "not_ready", "the models are still loading", {"Retry-After": "5"})
        return self.models.for_role(TASKS[task_name].role)

    async def run(self, task_name: str, call: Any) -> Any:
        """Queue `call` on its model's worker and await its result (a JSON-ready dict). 503 with
        Retry-After when the queue is full; the call's own exception otherwise. Cancelling the wait (the
        request's timeout) cancels the call if the worker has not taken it yet."""
        model = self.model_for(task_name)
        try:
            future = self._batchers[id(model)].submit(task_name, TASKS[task_name].key(call), call)
        except QueueFull as e:
            raise ServiceError(503, "overloaded", f"the service is busy: {e}", {"Retry-After": "1"}) from None
        return await asyncio.wrap_future(future)
