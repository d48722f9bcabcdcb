"""`stream: true`: a generation's text as server-sent events while it is decoded.

A streamed request is one image with one prompt (caption: one image; ask: one image and one question; chat:
its conversation), with any num_return_sequences (one row of text each). It is queued on the model's worker
like any call but never merged with others (a batch of one: the per-step callback belongs to one request),
and while it runs the decoding loop hands each step's tokens to `TokenStream.on_step`.

Greedy search and sampling stream token by token. Each row's ids so far are decoded whole and only the text
past what was sent goes out, and not while it ends in U+FFFD (a multi-byte character split across tokens),
so no character is ever split. Beam search cannot stream (a later step may replace a beam's earlier tokens):
its text comes as one event when it ends. The last event completes each row to the returned text, so the
streamed pieces always concatenate to exactly the non-streamed response.

An error before the first event is an ordinary JSON error response; after it, an `error` event. A client
that disconnects stops the decoding at its next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse

from .errors import from_exception
from .tasks import AskCall, CaptionCall, StreamCall

log = logging.getLogger("blip2.server")

_DONE = object()  # the queue's last item: the call has ended
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamCancelled(Exception):
    """Raised in the decoding loop when the client has gone: the call ends there."""


class TokenStream:
    """The text deltas of one streamed call: fed by the model's worker thread (`on_step`), read by the
    event loop (`deltas`)."""

    def __init__(self, text: Any, loop: asyncio.AbstractEventLoop):
        self._text = text  # the checkpoint's TextProcessor
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ids: list[list[int]] = []  # per row: the tokens so far
        self._sent: list[str] = []  # per row: the text sent so far
        self.cancelled = False

    def on_step(self, tokens: Any) -> None:
        """One decoding step's tokens (R,), on the worker thread."""
        if self.cancelled:
            raise StreamCancelled("the client disconnected")
        chosen = tokens.tolist()
        if not self._ids:
            self._ids, self._sent = [[] for _ in chosen], ["" for _ in chosen]
        for row, token in enumerate(chosen):
            self._ids[row].append(token)
            delta = self._advance(row, self._text.decode(self._ids[row]))
            if delta:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (row, delta))

    def _advance(self, row: int, text: str) -> str:
        """The part of `text` (row's decoded text so far) not yet sent, if it can be sent now."""
        sent = self._sent[row]
        if text.endswith("\ufffd") or not text.startswith(sent):
            return ""
        self._sent[row] = text
        return text[len(sent) :]

    def finish(self, texts: list[str]) -> list[tuple[int, str]]:
        """The last delta of each row: the returned text past what was sent (all of it for beam search)."""
        sent = self._sent or ["" for _ in texts]
        rest = []
        for row, text in enumerate(texts):
            if not text.startswith(sent[row]):  # cannot happen with a prefix-stable decode; never silent
                log.warning("streamed text %r is not a prefix of the result %r", sent[row], text)
            elif len(text) > len(sent[row]):
                rest.append((row, text[len(sent[row]) :]))
        return rest

    async def run(self, started: asyncio.Future) -> AsyncIterator[tuple[int, str]]:
        """The deltas as they come, until `started` (the call) ends."""
        started.add_done_callback(lambda _: self._queue.put_nowait(_DONE))
        while (item := await self._queue.get()) is not _DONE:
            yield item


Texts = Callable[[dict], list[str]]  # a call's JSON result -> the text of each streamed row
Format = Callable[[str, Any], list[str]]  # (event kind, payload) -> SSE frames


async def respond(service: Any, call: StreamCall, stream: TokenStream, texts: Texts, fmt: Format) -> Response:
    """Run `call` and answer with its events. The first event (or the call's error) is awaited before the
    response starts, so that a request that fails at once gets its plain 4xx JSON."""
    started = asyncio.ensure_future(service.run("stream", call))
    # A call ended by a client that left is nobody's error: retrieve it so that asyncio does not log it.
    started.add_done_callback(lambda done: done.cancelled() or done.exception())
    deltas = stream.run(started).__aiter__()
    try:
        first: tuple[int, str] | None = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
        started.result()  # raises the call's error, answered as a JSON error
    except asyncio.CancelledError:  # the request timed out: a call still queued is dropped
        started.cancel()
        raise
    return StreamingResponse(
        _events(first, deltas, started, stream, texts, fmt),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _events(first, deltas, started, stream: TokenStream, texts: Texts, fmt: Format):
    try:
        yield "".join(fmt("start", None))
        if first is not None:
            yield "".join(fmt("delta", first))
        async for delta in deltas:
            yield "".join(fmt("delta", delta))
        try:
            result = await started
        except Exception as e:
            yield "".join(fmt("error", from_exception(e, "a streamed request").body()))
            return
        for delta in stream.finish(texts(result)):
            yield "".join(fmt("delta", delta))
        yield "".join(fmt("done", result))
    finally:
        stream.cancelled = True  # ends the decoding if the client left early (no effect once it is done)


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event frame."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


def task_format(kind: str, payload: Any) -> list[str]:
    """caption / ask events: `{"index", "text"}` deltas, then `event: done` with the non-streamed body (or
    `event: error` with the error body)."""
    if kind == "delta":
        row, text = payload
        return [sse({"index": row, "text": text})]
    if kind == "done":
        return [sse(payload, "done")]
    if kind == "error":
        return [sse(payload, "error")]
    return []


def task_texts(result: dict) -> list[str]:
    """The rows of a one-image caption / ask result: its text, or its num_return_sequences texts."""
    (value,) = next(iter(result.values()))
    return value if isinstance(value, list) else [value]


def check_one(call: CaptionCall | AskCall) -> None:
    """A streamed caption / ask is one image and one prompt (422 otherwise)."""
    from .errors import invalid

    questions = call.questions if isinstance(call, AskCall) else [None]
    if len(call.images) != 1 or len(questions) != 1:
        raise invalid("stream: a streamed request takes one image (and one question)")


async def stream_task(service: Any, task: str, call: CaptionCall | AskCall, model: Any) -> Response:
    """POST /v1/caption or /v1/ask with stream: true."""
    check_one(call)
    stream = TokenStream(model.text, asyncio.get_running_loop())
    return await respond(service, StreamCall(task, call, stream.on_step), stream, task_texts, task_format)
