"""The batch iterator every front end uses: each input becomes its result or the `Blip2Error` that stopped
it, in input order, a batch at a time; and `prepared_ahead`, which prepares (decodes) the next batch in a
small thread pool while the model works on the current one.

Each image is decoded once and resized to the model's input size at once (resizing again to the same size
gives the same image, so results do not change). At most two batches of those model-size images are held,
the one the model works on and the one being decoded: a run over a million files needs the memory of two
batches. A bad input fails alone; an error in the task itself (a bad option, a prompt too long, a checkpoint
that cannot do the task) concerns every input and is raised.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..errors import Blip2Error
from ..images import load_resized
from .engine import Engine, ImageInput

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Result = TypeVar("Result")

# Threads that decode images ahead of the model (read at call time; 0 decodes in the calling thread, in
# turn). PIL and numpy release the GIL while decoding, resizing and normalizing, so threads decode in
# parallel; more than a few only compete with the model for the cores.
DECODE_WORKERS = min(8, os.cpu_count() or 1)


def each_image(
    engine: Engine, images: Sequence[ImageInput], run: Callable[[list], Sequence[Result]]
) -> Iterator[tuple[ImageInput, Result | Blip2Error]]:
    """Yield (image, result or its ImageError) in input order, `engine.batch_size` images at a time. `run`
    takes the decoded model-size images of a batch (the good ones) and returns one result each.

    Decoded in this thread, in turn, for now: with the read-ahead pool here, a Ctrl-C sent to a CLI embed
    run was lost in the full test suite (tests/cli/test_cli.py::test_embed_ctrl_c_in_a_real_process), not
    yet explained; `Blip2.caption` / `ask` (captioning.run) decode ahead in `DECODE_WORKERS` threads."""
    return each_input(images, engine.batch_size, lambda image: load_resized(image, engine.image_config), run)


def each_input(
    items: Sequence[Item],
    batch_size: int,
    prepare: Callable[[Item], object],
    run: Callable[[list], Sequence[Result]],
    workers: int = 0,
) -> Iterator[tuple[Item, Result | Blip2Error]]:
    """Yield (item, result or Blip2Error) in input order: `prepare` each item of a batch of `batch_size`
    (a Blip2Error it raises is that item's result), then `run` the prepared ones together, one result each.
    With `workers` > 0 the next batch is prepared in that many threads while `run` works (`prepared_ahead`);
    the results are the same."""
    chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    for chunk, prepared in zip(chunks, prepared_ahead(chunks, lambda item: _attempt(prepare, item), workers)):
        good = [p for p in prepared if not isinstance(p, Blip2Error)]
        results = iter(run(good) if good else [])
        for item, p in zip(chunk, prepared):
            yield item, p if isinstance(p, Blip2Error) else next(results)


def prepared_ahead(
    chunks: Sequence[Sequence[Item]], prepare: Callable[[Item], Prepared], workers: int
) -> Iterator[list[Prepared]]:
    """Yield `[prepare(item) for item in chunk]` for each chunk in turn, preparing the items of a chunk in
    `workers` threads and submitting the next chunk's items before the current one is yielded, so they are
    prepared while the caller works on it. No more than one chunk ahead: memory stays bounded.

    An exception `prepare` raises surfaces when its chunk is due, in item order, as it would in turn; the
    chunks after it are not prepared. `workers` < 1 (or a single item) prepares in this thread, in turn."""
    if workers < 1 or sum(len(chunk) for chunk in chunks) <= 1:
        for chunk in chunks:
            yield [prepare(item) for item in chunk]
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="blip2-decode", initializer=_hold_signals)
    try:
        pending: list[Future[Prepared]] = [pool.submit(prepare, item) for item in chunks[0]]
        for following in [*chunks[1:], None]:
            current = [future.result() for future in pending]
            pending = [] if following is None else [pool.submit(prepare, item) for item in following]
            yield current
    finally:  # done, or the caller stopped early (Ctrl-C, an error): drop what was not started; the
        # item or two still being prepared finish on their own (their threads are joined at exit)
        pool.shutdown(wait=False, cancel_futures=True)


def _hold_signals() -> None:
    """(In each decode thread) block SIGINT and SIGTERM here, so that the kernel delivers them to the main
    thread, whose wait for a decode they then interrupt at once (Python runs the handler there anyway)."""
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _attempt(prepare: Callable[[Item], object], item: Item) -> object:
    try:
        return prepare(item)
    except Blip2Error as e:
        return e
