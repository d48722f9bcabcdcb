"""The batch iterator: each input -> its result or its Blip2Error, in order, one batch prepared at a time."""

from __future__ import annotations

import pytest

from blip2.errors import ImageError, InputError
from blip2.tasks.batch import each_input


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
