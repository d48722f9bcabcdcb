"""The batch iterator: each input -> its result or its Blip2Error, in order, one batch prepared at a time."""

from __future__ import annotations

import threading

import pytest

from blip2.errors import ImageError, InputError
from blip2.tasks.batch import each_input, prepared_ahead


def test_each_input_isolates_errors_keeps_order_and_prepares_one_batch_at_a_time():
    events = []

    def prepare(item):
        events.append(("prepare", item))
        if item < 0:
            raise ImageError(str(item), "bad")
        return item * 10

    def run(batch):
        events.append(("run", list(batch)))
        return [x + 1 for x in batch]

    out = list(each_input([1, -2, 3, 4, -5, -6, 7], 3, prepare, run))
    assert [item for item, _ in out] == [1, -2, 3, 4, -5, -6, 7]
    assert [r if isinstance(r, int) else str(r) for _, r in out] == [
        11,
        "-2: bad",
        31,
        41,
        "-5: bad",
        "-6: bad",
        71,
    ]
    assert [e for e in events if e[0] == "run"] == [("run", [10, 30]), ("run", [40]), ("run", [70])]
    # a batch is prepared only once the previous one has been run
    assert events.index(("prepare", 4)) > events.index(("run", [10, 30]))


def test_each_input_skips_run_for_a_batch_of_bad_inputs_and_raises_task_errors():
    def bad(item):
        raise ImageError(str(item), "unreadable")

    out = list(each_input([1, 2], 2, bad, lambda batch: pytest.fail("run called with no good input")))
    assert all(isinstance(r, ImageError) for _, r in out)

    def refuse(batch):
        raise InputError("the prompt is too long")

    with pytest.raises(InputError):
        list(each_input([1], 1, lambda x: x, refuse))


def _prepare_recording(names):
    """A prepare that records the thread it ran in and fails (ImageError) for negative items."""

    def prepare(item):
        names.append(threading.current_thread().name)
        if item < 0:
            raise ImageError(str(item), "bad")
        return item * 10

    return prepare


@pytest.mark.parametrize("batch_size", [1, 2, 3, 10])
def test_each_input_gives_the_same_results_with_the_decode_pool(batch_size):
    items = [1, -2, 3, 4, -5, -6, 7, 8]

    def run(batch):
        return [x + 1 for x in batch]

    def results(workers, names):
        out = each_input(items, batch_size, _prepare_recording(names), run, workers=workers)
        return [(item, r if isinstance(r, int) else str(r)) for item, r in out]

    serial_names, pool_names = [], []
    serial = results(0, serial_names)
    assert results(2, pool_names) == serial
    assert serial[1] == (-2, "-2: bad")  # a bad input still fails alone
    assert set(serial_names) == {threading.current_thread().name}
    assert all(name.startswith("blip2-decode") for name in pool_names)


def test_prepared_ahead_prepares_the_next_chunk_while_the_caller_works_and_no_further():
    chunks = [[0, 1], [2, 3], [4, 5]]
    prepared = []
    next_chunk_started = threading.Event()

    def prepare(item):
        prepared.append(item)
        if item == 2:
            next_chunk_started.set()
        return item

    chunks_out = prepared_ahead(chunks, prepare, workers=2)
    assert next(chunks_out) == [0, 1]
    # the caller holds chunk 0: chunk 1 is being prepared meanwhile (the wait is a deadlock guard, it
    # returns as soon as item 2 is prepared), chunk 2 not yet (one chunk ahead at most)
    assert next_chunk_started.wait(timeout=30)
    assert set(prepared) <= {0, 1, 2, 3}
    assert list(chunks_out) == [[2, 3], [4, 5]]
    assert sorted(prepared) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("workers", [0, 2])
def test_prepared_ahead_raises_an_error_when_its_chunk_is_due_and_prepares_no_chunk_after(workers):
    prepared = []

    def prepare(item):
        prepared.append(item)
        if item == 3:
            raise ValueError("broken")
        return item

    chunks_out = prepared_ahead([[0, 1], [2, 3], [4, 5]], prepare, workers)
    assert next(chunks_out) == [0, 1]
    with pytest.raises(ValueError, match="broken"):
        next(chunks_out)
    assert not {4, 5} & set(prepared)
