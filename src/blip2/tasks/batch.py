"""The batch iterator every front end uses: each input becomes its result or the `Blip2Error` that stopped
it, in input order, a batch at a time.

Each image is decoded once and resized to the model's input size at once (resizing again to the same size
gives the same image, so results do not change), and only one batch of those model-size images is held: a
run over a million files needs the memory of one batch. A bad input fails alone; an error in the task itself
(a bad option, a prompt too long, a checkpoint that cannot do the task) concerns every input and is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from ..errors import Blip2Error
from ..images import load_resized
from .engine import Engine, ImageInput

Item = TypeVar("Item")
Result = TypeVar("Result")


def each_image(
    engine: Engine, images: Sequence[ImageInput], run: Callable[[list], Sequence[Result]]
) -> Iterator[tuple[ImageInput, Result | Blip2Error]]:
    """Yield (image, result or its ImageError) in input order, `engine.batch_size` images at a time. `run`
    takes the decoded model-size images of a batch (the good ones) and returns one result each."""
    return each_input(images, engine.batch_size, lambda image: load_resized(image, engine.image_config), run)


def each_input(
    items: Sequence[Item],
    batch_size: int,
    prepare: Callable[[Item], object],
    run: Callable[[list], Sequence[Result]],
) -> Iterator[tuple[Item, Result | Blip2Error]]:
    """Yield (item, result or Blip2Error) in input order: `prepare` each item of a batch of `batch_size`
    (a Blip2Error it raises is that item's result), then `run` the prepared ones together, one result each."""
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prepared = [_attempt(prepare, item) for item in chunk]
        good = [p for p in prepared if not isinstance(p, Blip2Error)]
        results = iter(run(good) if good else [])
        for item, p in zip(chunk, prepared):
            yield item, p if isinstance(p, Blip2Error) else next(results)


def _attempt(prepare: Callable[[Item], object], item: Item) -> object:
    try:
        return prepare(item)
    except Blip2Error as e:
        return e
