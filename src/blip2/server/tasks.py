"""The service's task layer: a request becomes a *call* of one task (its decoded images, texts, options);
calls of one task with equal *keys* are merged into one call of the `Blip2` API and the results split back,
one JSON-ready body per request. The API does the work; here is only how requests combine.

- caption: images concatenated, each with its request's prompt; merged when the options agree (and all or
  none give a prompt: the default prompt is the task's, not ours to repeat).
- ask / match: each request's (image, text) pairs, by the API's own pairing rule (`inputs.pairs`),
  concatenated; ask merges when the options and the template agree.
- similarity: all images against all texts, each request's block cut out (the extra pairs are dot products).
- embed: images and texts concatenated; each request's per-token text outputs trimmed to its longest text,
  as its own call would pad them.
- classify: one image per API call: never merged (the image cache still spares the vision tower).

A merged call that fails (a prompt too long in one request, a bad option) is run again one request at a
time (`execute`), so that each request gets its own result or its own error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ..tasks import inputs

Model = Any  # a `blip2.Blip2` (typed loosely: this module does not import torch or the model code)


@dataclasses.dataclass(frozen=True)
class CaptionCall:
    images: list
    prompt: str | None
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AskCall:
    images: list
    questions: list[str]
    template: str | None
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PairCall:
    """match and similarity: images and texts."""

    images: list
    texts: list[str]


@dataclasses.dataclass(frozen=True)
class EmbedCall:
    images: list  # may be empty
    texts: list[str]  # may be empty


@dataclasses.dataclass(frozen=True)
class ClassifyCall:
    image: Any
    labels: list[str]
    params: dict[str, Any]  # template, rerank, top_k, temperature: those the request gave


@dataclasses.dataclass(frozen=True)
class SearchCall:
    index: Any  # search.SearchIndex
    query: dict[str, Any]  # Index.search's keyword arguments


@dataclasses.dataclass(frozen=True)
class StreamCall:
    """A caption or ask call (one image, one prompt) whose decoding steps go to `on_step` (streaming.py)."""

    task: str  # "caption" or "ask"
    call: CaptionCall | AskCall
    on_step: Callable[[Any], None]


@dataclasses.dataclass(frozen=True)
class Task:
    """How a task's calls merge: `key(call)` (equal keys may merge, None never does) and `run(model,
    calls)` -> one result per call. `role` names the model it needs ("generate" or "match")."""

    name: str
    role: str
    key: Callable[[Any], Hashable | None]
    run: Callable[[Model, list], list]


def execute(model: Model, task: Task, calls: list) -> list:
    """One result per call, or the exception that call alone ends with: a merged call that fails is run
    again one call at a time, so one bad request never fails the others."""
    try:
        return task.run(model, calls)
    except Exception as e:
        if len(calls) == 1:
            return [e]
        return [execute(model, task, [call])[0] for call in calls]


# -- the tasks ------------------------------------------------------------------------------------------------
def _caption(model: Model, calls: list[CaptionCall]) -> list[dict]:
    images = [image for call in calls for image in call.images]
    prompt = None if calls[0].prompt is None else [call.prompt for call in calls for _ in call.images]
    captions = model.caption(images, prompt, **calls[0].options)
    return [{"captions": part} for part in _split(captions, [len(call.images) for call in calls])]


def _ask(model: Model, calls: list[AskCall]) -> list[dict]:
    template, options = calls[0].template, calls[0].options
    if len(calls) == 1:  # the API's own pairing: one image with many questions is encoded once
        return [{"answers": model.ask(calls[0].images, calls[0].questions, template, **options)}]
    images, questions, counts = _pairs([(call.images, call.questions) for call in calls], "questions")
    answers = model.ask(images, questions, template, **options)
    return [{"answers": part} for part in _split(answers, counts)]


def _match(model: Model, calls: list[PairCall]) -> list[dict]:
    images, texts, counts = _pairs([(call.images, call.texts) for call in calls], "texts")
    probabilities = model.match(images, texts)
    return [{"probabilities": part} for part in _split(probabilities, counts)]


def _similarity(model: Model, calls: list[PairCall]) -> list[dict]:
    scores = model.similarity(_flat(call.images for call in calls), _flat(call.texts for call in calls))
    rows = _bounds([len(call.images) for call in calls])
    columns = _bounds([len(call.texts) for call in calls])
    return [{"scores": scores[r0:r1, c0:c1].tolist()} for (r0, r1), (c0, c1) in zip(rows, columns)]


def _embed(model: Model, calls: list[EmbedCall]) -> list[dict]:
    images, texts = _flat(call.images for call in calls), _flat(call.texts for call in calls)
    image_out = model.embed_images(images) if images else {}
    text_out = model.embed_texts(texts) if texts else {}
    results = []
    image_rows = _bounds([len(call.images) for call in calls])
    text_rows = _bounds([len(call.texts) for call in calls])
    for call, (i0, i1), (t0, t1) in zip(calls, image_rows, text_rows):
        result: dict[str, Any] = {"images": None, "texts": None}
        if call.images:
            result["images"] = {name: value[i0:i1].tolist() for name, value in image_out.items()}
        if call.texts:
            result["texts"] = _text_rows(text_out, t0, t1)
        results.append(result)
    return results


def _text_rows(text_out: dict, start: int, stop: int) -> dict[str, list]:
    """Rows start:stop of `embed_texts`'s output, the per-token ones trimmed to their longest text."""
    mask = text_out["attention_mask"][start:stop]  # (n, L)
    length = int(mask.sum(dim=1).max())
    return {
        "text_embeds": text_out["text_embeds"][start:stop, :length].tolist(),
        "attention_mask": mask[:, :length].tolist(),
        "text_embeds_proj": text_out["text_embeds_proj"][start:stop].tolist(),
    }


def _classify(model: Model, calls: list[ClassifyCall]) -> list[dict]:
    return [{"labels": model.classify(call.image, call.labels, **call.params)} for call in calls]


def _search(model: Model, calls: list[SearchCall]) -> list[dict]:
    return [{"hits": call.index.search(model, call.query)} for call in calls]


def _stream(model: Model, calls: list[StreamCall]) -> list[dict]:
    """Never merged (its key is None): the model's step callback is this one call's while it runs."""
    (call,) = calls
    model.on_step = call.on_step
    try:
        return TASKS[call.task].run(model, [call.call])
    finally:
        model.on_step = None


def _frozen(options: dict[str, Any]) -> tuple:
    return tuple(sorted(options.items()))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "caption",
            "generate",
            lambda call: ("caption", call.prompt is None, _frozen(call.options)),
            _caption,
        ),
        Task("ask", "generate", lambda call: ("ask", call.template, _frozen(call.options)), _ask),
        Task("match", "match", lambda call: ("match",), _match),
        Task("similarity", "match", lambda call: ("similarity",), _similarity),
        Task("embed", "match", lambda call: ("embed",), _embed),
        Task("classify", "match", lambda call: None, _classify),
        Task("search", "match", lambda call: None, _search),
        Task("stream", "generate", lambda call: None, _stream),
    )
}


# -- merging and splitting ------------------------------------------------------------------------------------
def check_pairs(n_images: int, texts: list[str], what: str) -> None:
    """The API's pairing rule, checked when a request arrives (an InputError naming `what`)."""
    inputs.pairs(n_images, texts, what)


def _pairs(requests: list[tuple[list, list[str]]], what: str) -> tuple[list, list[str], list[int]]:
    """Each request's (image, text) pairs by the API's pairing rule, concatenated one to one: images,
    texts, and the number of pairs of each request."""
    images: list = []
    texts: list[str] = []
    counts = []
    for request_images, request_texts in requests:
        rows, paired = inputs.pairs(len(request_images), request_texts, what)
        images += [request_images[row] for row in rows]
        texts += paired
        counts.append(len(rows))
    return images, texts, counts


def _flat(lists) -> list:
    return [item for items in lists for item in items]


def _bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[2, 3] -> [(0, 2), (2, 5)]."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [(start, start + count) for start, count in zip(starts, counts)]


def _split(items: Sequence, counts: Sequence[int]) -> list[list]:
    return [list(items[start:stop]) for start, stop in _bounds(counts)]
