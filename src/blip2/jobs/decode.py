"""Decoding ahead of the model in worker processes: a job's `--workers N`.

`DecodePool(prepare, workers=N)` runs `prepare` (read, decode, orient, convert and resize an image to the
model's input size: the expensive part of preprocessing) on a job's inputs in N processes of their own,
and `DecodePool.map` yields the results in input order. A thread of the main process keeps the workers
fed while the model works, with at most `ahead` inputs submitted and not yet taken by the model, so a job
over a million images holds `ahead` model-size images, never the whole input. Only the rescaling and
normalization of those model-size images (well under a millisecond each) is left to the main process.

Each input fails alone: a `Blip2Error` that `prepare` raises is that input's result; a worker that dies on
an input (a decoder crash, the kernel's OOM killer on a decompression bomb) or that works on one input for
longer than `timeout_s` is replaced by a fresh process and the input's result says so (`lost`: an
`ImageError` by default); the others go on. Any other exception from `prepare` is a bug: it is raised in
the main process when its input's turn comes.

Workers are forked from Python's fork server, a fresh process that imports PIL, numpy and torch once (a
fork of the main process, which has loaded a model and started torch's thread pools, can hang), so
`prepare` and the inputs must be picklable (a module-level function or a `functools.partial` of one), and
a worker that replaces a dead one starts in a fraction of a second. Module attributes changed at run time
in the main process (e.g. `blip2.images.MAX_PIXELS`) are not seen by the workers.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

from ..errors import Blip2Error, ImageError
from ..tasks.batch import DECODE_WORKERS, _hold_signals, each_input

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Result = TypeVar("Result")

TIMEOUT_S = 120.0  # one image decoded for longer than this is a hung decoder (a photo takes milliseconds)
# What every worker needs, imported once by the fork server: the heavy third-party modules, not blip2, which
# each worker imports with its parent's sys.path (the server's own path is the one it started with).
PRELOAD = ["numpy", "PIL.Image", "torch"]
_POLL_S = 0.2  # how often the feeding thread looks at the clock and at a request to stop


class DecodePool(Generic[Item, Prepared]):
    """`workers` processes running `prepare`; use as a context manager (the processes end with it).

    `ahead` bounds the inputs submitted and not yet taken by the consumer of `map` (at least one per worker;
    two model batches keep the model fed: the one it takes next and the one decoded while it works);
    `lost(item, reason)` is the result of an input whose worker died or overran (default: an ImageError
    naming it by `str`)."""

    def __init__(
        self,
        prepare: Callable[[Item], Prepared],
        workers: int,
        *,
        ahead: int = 64,
        timeout_s: float = TIMEOUT_S,
        lost: Callable[[Item, str], Blip2Error] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {workers}")
        self.prepare = prepare
        self.ahead = max(workers, ahead)
        self.timeout_s = timeout_s
        self.lost = lost or (lambda item, reason: ImageError(str(item), reason))
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)  # no effect once the server runs: then it has them
        self._workers = [self._start() for _ in range(workers)]

    def __enter__(self) -> DecodePool[Item, Prepared]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the worker processes (those busy with an input are killed: their result is not wanted)."""
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def _start(self) -> _Worker:
        return _Worker(self._context, self.prepare)

    def map(self, items: Iterable[Item]) -> Generator[Prepared | Blip2Error, None, None]:
        """`prepare(item)`, or the Blip2Error it raised or that stopped its worker, for each item in order.
        `items` is consumed by the pool's feeding thread, `ahead` items at most ahead of the consumer."""
        feed = _Feed(self, iter(items))
        thread = threading.Thread(target=feed.run, name="blip2-decode-feed", daemon=True)
        thread.start()
        try:
            yield from feed.results()
        finally:  # done, or the consumer stopped early (an error, Ctrl-C): stop feeding
            feed.stop.set()
            thread.join()

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        self._workers[self._workers.index(worker)] = self._start()


class _Worker:
    """One process running `_serve`, and the input it is working on (None when idle)."""

    def __init__(self, context: Any, prepare: Callable) -> None:
        self.connection, theirs = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(theirs, prepare), name="blip2-decode", daemon=True
        )
        self.process.start()
        theirs.close()  # so that our end sees EOF when the process dies
        self.started = False  # True once the process has imported what `prepare` needs and says so
        self.task: tuple[int, Any, float] | None = None  # (sequence number, item, submitted at)

    def submit(self, number: int, item: Any) -> None:
        self.connection.send(item)
        self.task = (number, item, time.monotonic())

    def stop(self) -> None:
        self.connection.close()  # an idle worker ends on EOF
        self.process.join(timeout=1.0 if self.task is None else 0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class _Feed:
    """The state `DecodePool.map` shares between its feeding thread (`run`) and its consumer (`results`)."""

    def __init__(self, pool: DecodePool, items: Iterator) -> None:
        self.pool = pool
        self.items: Iterator | None = items
        self.stop = threading.Event()
        self.ready = threading.Condition()
        self.done: dict[int, tuple[str, Any]] = {}  # sequence number -> ("ok" | "raise", value)
        self.submitted = 0  # inputs taken from `items`
        self.taken = 0  # results yielded to the consumer
        self.end: BaseException | None = None  # what ended the feed early: `items` raised, or a bug here

    def results(self) -> Iterator:
        """The results in input order, as they come; what `prepare` or `items` raised, where it belongs."""
        while True:
            with self.ready:
                while self.taken not in self.done and not self._over():
                    self.ready.wait()
                if self.taken not in self.done:  # the feed ended and every result has been taken
                    if self.end is not None:
                        raise self.end
                    return
                kind, value = self.done.pop(self.taken)
                self.taken += 1
                self.ready.notify_all()  # room for one more input ahead
            if kind == "raise":
                raise value
            yield value

    def _over(self) -> bool:
        """(Holding `ready`) no result is to come: the inputs are exhausted and all taken, or the feed
        ended early (then the results still in flight are dropped)."""
        return self.end is not None or (self.items is None and self.taken == self.submitted)

    def run(self) -> None:
        """(The feeding thread) submit inputs to idle workers while fewer than `ahead` are pending, and
        collect their results, until `items` is exhausted and every input has its result, or `stop`."""
        _hold_signals()
        try:
            while not self.stop.is_set() and not (self.items is None and self._idle()):
                self._submit()
                self._collect()
        except BaseException as e:  # `items` raised, or a worker did not start: the consumer gets the
            # results already in, then this error
            with self.ready:
                self.end = e
                self.ready.notify_all()
        finally:
            if self.items is not None:
                with self.ready:
                    self.items = None
                    self.ready.notify_all()

    def _idle(self) -> bool:
        return all(worker.task is None for worker in self.pool._workers)

    def _submit(self) -> None:
        for worker in self.pool._workers:
            if not worker.started or worker.task is not None or self.items is None:
                continue
            with self.ready:
                if self.submitted - self.taken >= self.pool.ahead:
                    return
            item = next(self.items, _END)
            if item is _END:
                with self.ready:
                    self.items = None
                    self.ready.notify_all()
                return
            worker.submit(self.submitted, item)
            with self.ready:
                self.submitted += 1

    def _collect(self) -> None:
        """Wait (briefly) for the workers starting or busy: record each result, death and timeout."""
        watched = [worker for worker in self.pool._workers if worker.task is not None or not worker.started]
        if not watched:
            with self.ready:  # `ahead` inputs pending: wait for the consumer to take one
                self.ready.wait(_POLL_S)
            return
        ready = wait([w.connection for w in watched] + [w.process.sentinel for w in watched], _POLL_S)
        for worker in watched:
            answered = worker.connection in ready or worker.process.sentinel in ready
            if not worker.started:
                worker.started = answered and _receive(worker) == ("started", None)
                if answered and not worker.started:
                    raise RuntimeError(f"a decode worker did not start ({_how(worker.process)})")
            elif answered:
                self._record(worker, _receive(worker))
            elif time.monotonic() - worker.task[2] > self.pool.timeout_s:  # type: ignore[index]
                self._record(worker, None, f"decoding took over {self.pool.timeout_s:g} s")

    def _record(self, worker: _Worker, outcome: tuple[str, Any] | None, failure: str = "") -> None:
        """The outcome of the worker's input; None when the worker died on it or (`failure`) overran."""
        number, item, _ = worker.task  # type: ignore[misc]
        if outcome is None:
            reason = failure or f"the decoding process died on this input ({_how(worker.process)})"
            outcome = ("ok", self.pool.lost(item, reason))
            self.pool._replace(worker)
        worker.task = None
        with self.ready:
            self.done[number] = outcome
            self.ready.notify_all()


_END = object()


def _receive(worker: _Worker) -> tuple[str, Any] | None:
    """The worker's answer, or None when it died before giving one."""
    try:
        return pickle.loads(worker.connection.recv_bytes())
    except (EOFError, OSError):
        return None


def _how(process: Any) -> str:
    """How a worker process ended, e.g. "killed by signal 9"."""
    process.join(timeout=5.0)
    code = process.exitcode
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


def _serve(connection: Connection, prepare: Callable) -> None:
    """(A worker process) answer each item with ("ok", prepare(item)), or ("ok", the Blip2Error it raised),
    or ("raise", a bug's exception), until the pool closes the connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it ends us
    connection.send_bytes(dumps(("started", None)))  # `prepare` unpickled, its imports done: time from now
    while True:
        try:
            item = connection.recv()
        except (EOFError, OSError):
            return
        try:
            answer: tuple[str, Any] = ("ok", prepare(item))
        except Blip2Error as e:
            answer = ("ok", e)
        except Exception as e:
            answer = ("raise", e)
        try:
            data = dumps(answer)
        except Exception as e:  # a result or an exception that cannot be pickled: a bug, said in words
            data = dumps(("raise", RuntimeError(f"{type(e).__name__}: {e}, from {answer[1]!r}")))
        try:
            connection.send_bytes(data)
        except OSError:
            return


class _Pickler(pickle.Pickler):
    """Pickles exceptions as their class, args and attributes, rebuilt without calling `__init__`: some
    Blip2Errors (ImageError) take other arguments than their message, so pickle's default for exceptions,
    `type(e)(*e.args)`, cannot rebuild them; an error held by another one is rebuilt the same way."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            return _rebuilt, (type(obj), obj.args, dict(vars(obj)))
        return NotImplemented


def dumps(obj: Any) -> bytes:
    """`obj` pickled, its exceptions (Blip2Errors among them) in a form that unpickles whole (`_Pickler`)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _rebuilt(kind: type[BaseException], args: tuple, attributes: dict) -> BaseException:
    error = kind.__new__(kind)
    error.args = args
    vars(error).update(attributes)
    return error


class Decoder:
    """How a job prepares its inputs ahead of the model, by `workers`: None in `DECODE_WORKERS` threads (as
    the library's `caption` does), 0 in the calling thread in turn, N > 0 in a `DecodePool` of N processes
    holding two batches ahead (`lost`: see `DecodePool`). A context manager: the processes live as long as
    the job."""

    def __init__(
        self,
        prepare: Callable[[Any], object],
        workers: int | None,
        batch_size: int,
        lost: Callable[[Any, str], Blip2Error] | None = None,
    ) -> None:
        self.prepare = prepare
        self.threads = DECODE_WORKERS if workers is None else 0
        self.batch_size = batch_size
        self.pool: DecodePool[Any, object] | None = None
        if workers:
            self.pool = DecodePool(prepare, workers, ahead=2 * batch_size, lost=lost)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.close()

    def each(
        self, items: Sequence[Item], run: Callable[[list], Sequence[Result]]
    ) -> Iterator[tuple[Item, Result | Blip2Error]]:
        """(item, result or Blip2Error) in input order, as `blip2.tasks.batch.each_input`."""
        if self.pool is not None:
            return each_decoded(self.pool, items, self.batch_size, run)
        return each_input(items, self.batch_size, self.prepare, run, self.threads)


def each_decoded(
    pool: DecodePool[Item, Any],
    items: Sequence[Item],
    batch_size: int,
    run: Callable[[list], Sequence[Result]],
) -> Iterator[tuple[Item, Result | Blip2Error]]:
    """As `blip2.tasks.batch.each_input`, with `pool` preparing: (item, result or Blip2Error) in input
    order, `run` called on the good prepared inputs of each batch of `batch_size`."""
    with contextlib.closing(pool.map(items)) as prepared:
        for start in range(0, len(items), batch_size):
            batch = [(item, next(prepared)) for item in items[start : start + batch_size]]
            good = [p for _, p in batch if not isinstance(p, Blip2Error)]
            results = iter(run(good) if good else [])
            for item, p in batch:
                yield item, p if isinstance(p, Blip2Error) else next(results)
