"""`--engine ray`: a job as a Ray Data pipeline, on a local Ray or on the cluster at `RAY_ADDRESS`.

    items (driver) -> read, hash, decode (CPU tasks, `map_batches`) -> model (a pool of actors, one model
    each, one GPU each when the cluster has GPUs) -> rows -> the driver commits them to the job's output

The driver expands the inputs and reads the rows done as the local engine does (`runner.commit_job`), so the
output, its schema, resume and the error rows are the same; only the rows in between are made by Ray. The
decode tasks run the local engine's `prepare_item` (read the input once, hash it, skip it when it was done
before, decode and resize it), the actors its `rows_for` on what the decode tasks give them: there is no
second copy of the task or row logic. Rows come back in input order (Ray Data's `preserve_order`), so the
rows written are those of the local engine, row for row, committed every `chunk_size` rows or a little more.
A chunk of inputs is also Ray's unit of work: one decode task call, one actor call (which runs its model's
batches over it), one block in the object store. A decode task that crashes is retried by Ray and then
fails the job (the local engine's `--workers` fails only the input).

Each actor loads the model itself (a checkpoint path every node can read, or a Hub id each node can fetch);
the driver reads only the checkpoint's image settings (for the decode tasks). Ray is imported only here
(`pip install 'blip2[ray]'`).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import Blip2Error
from ..image_config import ImageProcessorConfig
from ..loading.hub import resolve
from ..tasks.batch import _attempt, each_input
from .decode import dumps
from .inputs import Failed, Item
from .outputs import JobError, Output
from .runner import Chunk, Job, Prepare, PrepareItem, Summary, commit_job, rows_for

# What a decode task reserves: an image at the pixel limit decoded (178 MP RGB, 0.5 GB) and resized. Besides
# keeping nodes from decoding more than they hold, it keeps Ray from fusing the decode tasks into the model
# actors (it fuses maps with equal resource requests), where decoding would again make the model wait.
DECODE_MEMORY = 1 << 30


def import_ray() -> Any:
    """The `ray` module with Ray Data; a JobError saying which extra to install when Ray is missing."""
    try:
        import ray
        import ray.data  # noqa: F401  (the pipeline)
    except ImportError as e:
        raise JobError(f"--engine ray needs Ray Data: pip install 'blip2[ray]' ({e})") from None
    return ray


def image_settings(model: str) -> ImageProcessorConfig:
    """The image settings of checkpoint `model` (a path or a Hub id, resolved as `blip2.load` does), which
    the decode tasks need: the driver does not load the model."""
    return ImageProcessorConfig.from_checkpoint(resolve(model))


def connect(ray: Any) -> None:
    """Join the Ray cluster at RAY_ADDRESS, or start a local one; nothing when Ray is running already (a
    caller's own `ray.init`). Workers' logs stay in Ray's log folder rather than on this terminal."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)


def run_ray_job(
    inputs: Sequence[Item | Failed],
    output: Output,
    job: Job,
    prepare: Prepare,
    load: Callable[[], Any],
    task: Callable[[Any, list], Sequence[dict[str, Any]]],
    *,
    actors: int | None = None,
    chunk_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Run `job` over `inputs` as `runner.run_job` does, on Ray: `prepare` (picklable) decodes an image's
    bytes in the decode tasks, `load()` gives each actor its model, and `task(model, prepared images)` one
    dict of result columns per image. `actors`: model actors (default one per GPU of the cluster, or one on
    a cluster without GPUs). Rows are committed every `chunk_size` inputs, Ray's unit of work too."""
    ray = import_ray()
    connect(ray)

    def chunks(items: list[Item], prepare_item: PrepareItem, base: dict[str, Any]) -> Iterator[Chunk]:
        if items:
            model_stage = (load, task, base)
            stages = _pipeline(ray, items, prepare_item, model_stage, chunk_size, actors)
            yield from _gathered(_results(stages), chunk_size)

    return commit_job(inputs, output, job, prepare, chunks, progress)


def _pipeline(
    ray: Any, items: list[Item], prepare_item: PrepareItem, model_stage: tuple, batch: int, actors: int | None
) -> Any:
    """The Ray dataset of (rows, counts) records, one per model stage call on `batch` items, in item order;
    `model_stage`: the arguments of each actor's `_ModelStage`."""
    from ray.data import ActorPoolStrategy, DataContext

    from ..server.ray_serve import plan

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order, as the local engine writes them
    context.enable_progress_bars = False  # the job has its own (images/s, ETA)
    # Ray Data logs its failures, which the job reports in one line: its own messages would only repeat them
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    resources = ray.cluster_resources()
    actors, gpus = plan(resources.get("GPU", 0.0), actors, None)
    # never more than a quarter of the cluster's memory: a task asking for more would never be scheduled
    memory = min(DECODE_MEMORY, int(resources.get("memory", DECODE_MEMORY)) // 4)
    return (
        ray.data.from_items([{"item": pickle.dumps(item)} for item in items])
        .map_batches(_decode, fn_kwargs={"prepare_item": prepare_item}, batch_size=batch, memory=memory)
        .map_batches(
            _ModelStage,
            fn_constructor_args=model_stage,
            batch_size=batch,
            compute=ActorPoolStrategy(size=actors),
            **({"num_gpus": gpus} if gpus else {}),
        )
    )


def _decode(batch: dict[str, np.ndarray], prepare_item: PrepareItem) -> dict[str, np.ndarray]:
    """(A decode task) each item's `prepare_item` result or the Blip2Error that stopped it, pickled with
    `decode.dumps` (exceptions whole: an input done before, or failed, and why)."""
    outcomes = [dumps(_attempt(prepare_item, pickle.loads(item))) for item in batch["item"]]
    return {"item": batch["item"], "prepared": np.array(outcomes, dtype=object)}


class _ModelStage:
    """(An actor) one model, loaded when the actor starts; each call turns a batch of decoded items into
    their rows, `task(model, images)` giving their result columns. A Blip2Error of the model or the task
    (a checkpoint that does not load, a prompt too long) is returned as the call's record, pickled whole,
    for the driver to raise: Ray would pass it on as a wrapped error without its type."""

    def __init__(self, load: Callable[[], Any], task: Callable, base: dict[str, Any]) -> None:
        self.task = task
        self.base = base
        self.failure: Blip2Error | None = None
        try:
            self.model = load()
        except Blip2Error as e:
            self.failure = e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        record: Chunk | Blip2Error
        try:
            if self.failure is not None:
                raise self.failure
            items = [pickle.loads(item) for item in batch["item"]]
            ready = Ready([pickle.loads(p) for p in batch["prepared"]], self.model.batch_size)
            record = rows_for(items, ready, functools.partial(self.task, self.model), self.base)
        except Blip2Error as e:
            record = e
        return {"chunk": np.array([dumps(record)], dtype=object)}


class Ready:
    """Items prepared elsewhere (Ray's decode tasks), as a `runner.Decoding`: `each` runs them through
    `each_input`, so that batches and errors are those of the local engine."""

    def __init__(self, prepared: Sequence[object], batch_size: int) -> None:
        self.prepared = prepared
        self.batch_size = batch_size

    def each(self, items: Sequence[Item], run: Callable[[list], Sequence[Any]]) -> Iterator[tuple[Item, Any]]:
        for number, result in each_input(range(len(items)), self.batch_size, self._take, run):
            yield items[number], result

    def _take(self, number: int) -> object:
        prepared = self.prepared[number]
        if isinstance(prepared, Blip2Error):
            raise prepared
        return prepared


def _results(dataset: Any) -> Iterator[Chunk]:
    """The (rows, counts) of each model stage call, in item order. The Blip2Error of a model stage is
    raised as it was; any other failure of the pipeline (a bug) as a JobError with its last line."""
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for record in batch["chunk"]:
                chunk = pickle.loads(record)
                if isinstance(chunk, Blip2Error):
                    raise chunk
                yield chunk
    except Blip2Error:
        raise
    except Exception as e:
        last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise JobError(
            f"the Ray pipeline failed: {last[0]} (logs in /tmp/ray/session_latest/logs/)"
        ) from None


def _gathered(chunks: Iterator[Chunk], size: int) -> Iterator[Chunk]:
    """`chunks` regrouped into chunks of at least `size` rows (the last one smaller), counts summed."""
    rows: list[dict[str, Any]] = []
    counts = Summary()
    for more_rows, more_counts in chunks:
        rows += more_rows
        counts.add(more_counts)
        if len(rows) >= size:
            yield rows, counts
            rows, counts = [], Summary()
    if rows or counts.skipped:
        yield rows, counts
