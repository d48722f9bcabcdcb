"""The dynamic batcher: a bounded queue of calls in front of one worker thread that owns a model.

torch is not re-entrant for our purposes (one model, one stream of forward passes), so each model gets
exactly one thread that calls it. The worker takes the oldest call, waits up to `max_wait_s` from that
call's arrival for more calls with the same key (same task, compatible options), and runs up to
`max_batch` of them as one call of the API; calls with other keys wait their turn, in arrival order.

Each call has a `concurrent.futures.Future`: the event loop awaits it, and a call whose request timed out
is cancelled and skipped if it has not started. `close()` runs what is queued, then stops the thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("blip2.server")

# (task name, calls) -> one result or exception per call, in order
Execute = Callable[[str, list], list]


class QueueFull(Exception):
    """The queue holds `max_queue` calls (or the batcher is closing): come back later."""


@dataclasses.dataclass
class Job:
    task: str
    key: Hashable | None  # jobs with equal keys may share a call; None shares with none
    call: Any
    future: Future
    arrived: float  # time.monotonic()


class Batcher:
    """A queue of at most `max_queue` calls and the worker thread that runs them through `execute`."""

    def __init__(
        self,
        execute: Execute,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        name: str = "model",
    ):
        self.execute = execute
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._jobs: deque[Job] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name=f"blip2-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        """Calls waiting (not yet taken by the worker)."""
        with self._lock:
            return len(self._jobs)

    def submit(self, task: str, key: Hashable | None, call: Any) -> Future:
        """Queue `call` of `task`; its future gets the result (or the exception) of that call. QueueFull
        when `max_queue` calls are waiting or the batcher is closing."""
        future: Future = Future()
        with self._lock:
            if self._closing:
                raise QueueFull("the service is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting, the most the queue holds")
            self._jobs.append(Job(task, key, call, future, time.monotonic()))
            self._lock.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Stop taking calls, run those queued, and wait (up to `timeout` seconds) for the worker to end."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker -----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """The next jobs to run together: the oldest job and up to `max_batch` - 1 more with its key, once
        there are that many or the oldest has waited `max_wait_s`. None when closed and empty."""
        with self._lock:
            while not self._jobs:
                if self._closing:
                    return None
                self._lock.wait()
            head = self._jobs[0]
            deadline = head.arrived + self.max_wait_s
            while head.key is not None and not self._closing and self._count(head) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            return self._take(head)

    def _count(self, head: Job) -> int:
        return sum(_mergeable(job, head) for job in self._jobs)

    def _take(self, head: Job) -> list[Job]:
        if head.key is None:
            return [self._jobs.popleft()]
        taken = [job for job in self._jobs if _mergeable(job, head)][: self.max_batch]
        chosen = {id(job) for job in taken}
        self._jobs = deque(job for job in self._jobs if id(job) not in chosen)
        return taken

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drops timed-out ones
        if not live:
            return
        try:
            results = self.execute(live[0].task, [job.call for job in live])
        except (
            BaseException
        ) as e:  # `execute` isolates errors per call; this is a bug, but no caller may hang
            log.error("model worker failed", exc_info=e)
            results = [e] * len(live)
        for job, result in zip(live, results):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)


def _mergeable(job: Job, head: Job) -> bool:
    return head.key is not None and job.task == head.task and job.key == head.key
