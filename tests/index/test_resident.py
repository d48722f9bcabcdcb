"""Keeping the vectors resident: the madvise pieces cover the mapping in whole pages, the fallbacks, the stop
request, a real mapping on this kernel, and a resident index that searches as a plain one does."""

from __future__ import annotations

import mmap
import sys
import threading

import numpy as np
import pytest

from blip2.index import Index
from blip2.index.resident import MADV_POPULATE_READ, MADV_WILLNEED, chunks, populate
from blip2.index.store import NewRow, open_store

PAGE = 4096


@pytest.mark.parametrize(
    ("address", "length", "chunk"),
    [
        (0, 10 * PAGE, 3 * PAGE),
        (5 * PAGE + 100, 7 * PAGE, 2 * PAGE + 5),
        (PAGE, 1, 8 * PAGE),
        (0, 4 * PAGE, 1),
    ],
)
def test_chunks_cover_the_range_in_whole_aligned_pages(address, length, chunk):
    pieces = list(chunks(address, length, chunk, PAGE))
    starts = [at for at, _ in pieces]
    assert all(at % PAGE == 0 for at in starts) and all(0 < size <= max(PAGE, chunk) for _, size in pieces)
    # contiguous, from the page holding the first byte to past the last byte
    assert starts[0] == address - address % PAGE and pieces[-1][0] + pieces[-1][1] >= address + length
    assert all(a + size == b for (a, size), b in zip(pieces, starts[1:]))


class Kernel:
    """A fake madvise that records its calls and refuses the advices in `refused` (EINVAL)."""

    def __init__(self, refused=()):
        self.refused, self.calls = set(refused), []

    def __call__(self, address: int, length: int, advice: int) -> int:
        self.calls.append((address, length, advice))
        return 22 if advice in self.refused else 0


def _array(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes // 2, dtype="<f2")


def test_populate_asks_for_every_page_then_falls_back_to_read_ahead():
    array = _array(600 << 20)  # three chunks of 256 MiB
    kernel = Kernel()
    assert populate(array, kernel) == MADV_POPULATE_READ
    assert [advice for *_, advice in kernel.calls] == [MADV_POPULATE_READ] * 3
    assert (
        kernel.calls[0][0] <= array.ctypes.data and sum(size for _, size, _ in kernel.calls) >= array.nbytes
    )

    older = Kernel(refused={MADV_POPULATE_READ})  # before Linux 5.14: read-ahead only, asked once per chunk
    assert populate(array, older) == MADV_WILLNEED
    assert [advice for *_, advice in older.calls] == [
        MADV_POPULATE_READ,
        MADV_WILLNEED,
        MADV_WILLNEED,
        MADV_WILLNEED,
    ]

    neither = Kernel(refused={MADV_POPULATE_READ, MADV_WILLNEED})
    assert populate(array, neither) == 0 and len(neither.calls) == 2  # gives up after the first chunk


def test_a_stop_request_is_seen_between_chunks():
    stop = threading.Event()
    kernel = Kernel()

    def advise(address, length, advice):
        stop.set()  # asked to stop while the first chunk is being faulted in
        return kernel(address, length, advice)

    assert populate(_array(600 << 20), advise, stop) == MADV_POPULATE_READ and len(kernel.calls) == 1
    assert populate(_array(PAGE * 4), Kernel(), stop) == 0  # stopped before it began


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advices are Linux's")
def test_populate_faults_in_a_real_file_mapping(tmp_path):
    file = tmp_path / "v.f16"
    data = np.arange(3 * mmap.PAGESIZE, dtype="<f2")
    data.tofile(file)
    with open(file, "rb") as f:
        mapped = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype="<f2")
        assert populate(mapped) in (MADV_POPULATE_READ, MADV_WILLNEED)  # the real libc call is accepted
        np.testing.assert_array_equal(mapped, data)


def _add(index_path, n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, 4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    with open_store(index_path, writable=True) as store:
        store.bind(4, 8, "tiny", "")
        first = len(store)
        rows = [NewRow(f"img-{first + i}.jpg", f"h{first + i}", 1, 1.0, 1, 1) for i in range(n)]
        store.add(rows, vectors)
    return vectors


def test_a_resident_index_searches_as_a_plain_one_and_follows_new_rows(tmp_path):
    path = tmp_path / "r.idx"
    _add(path, 20, seed=0)
    query = np.random.default_rng(9).standard_normal(8).astype(np.float32)
    plain, kept = Index(path), Index(path, resident=True)
    assert [h.to_dict() for h in kept.search(embedding=query, k=5)] == [
        h.to_dict() for h in plain.search(embedding=query, k=5)
    ]
    thread, stop = kept._store()._cache["resident"]
    thread.join(10)
    assert not thread.is_alive() and not stop.is_set()

    _add(
        path, 5, seed=1
    )  # a new snapshot maps the grown file: the old thread is told to stop, a new one runs
    assert [h.image for h in kept.search(embedding=query, k=25)] == [
        h.image for h in plain.search(embedding=query, k=25)
    ]
    assert stop.is_set() and kept._store()._cache["resident"][0] is not thread
    assert "resident" not in plain._store()._cache
    kept.close()
    plain.close()
