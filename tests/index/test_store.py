"""The index store: rows and vectors round-trip, replace/move/copy/remove/compact keep rows and vectors
together, filters, binding, and every crafted file refused with an IndexFileError naming it."""

from __future__ import annotations

import numpy as np
import pytest

from blip2.errors import IndexBusyError, IndexFileError, IndexMismatchError, InputError
from blip2.index.store import NewRow, Where, open_store

Q, D = 4, 8


def _row(path: str, hash: str = "h", caption: str | None = None) -> NewRow:
    return NewRow(path, hash, size=10, mtime=1.5, width=3, height=2, caption=caption)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, Q, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "a.idx", writable=True) as s:
        s.bind(Q, D, "tiny", "fp1")
        yield s


def _by_path(store) -> dict[str, np.ndarray]:
    """Each live row's vectors, read through its slot."""
    vectors = store.vectors()
    return {r.path: np.array(vectors[r.slot]) for r in store.rows()}


def test_add_round_trips_rows_and_vectors(store, tmp_path):
    v = _vectors(3)
    assert store.add([_row("a"), _row("b", caption="x"), _row("c")], v) == [0, 1, 2]
    assert len(store) == 3 and store.meta().count == 3 and store.meta().num_query == Q
    np.testing.assert_array_equal(store.vectors(), v.astype(np.float16))
    b = store.get("b")
    assert (b.path, b.hash, b.size, b.mtime, b.width, b.height, b.slot, b.caption) == (
        "b",
        "h",
        10,
        1.5,
        3,
        2,
        1,
        "x",
    )
    with open_store(tmp_path / "a.idx") as reader:  # another connection sees the committed rows
        assert [r.path for r in reader.rows()] == ["a", "b", "c"]
        np.testing.assert_array_equal(reader.vectors(), v.astype(np.float16))
        assert not reader.vectors().flags.writeable


def test_replace_move_copy_remove_and_compact_keep_vectors_with_rows(store):
    v = _vectors(4)
    store.add([_row("a"), _row("b"), _row("c")], v[:3])
    store.add([_row("b", hash="h2")], v[3:])  # a changed file: replaced, its old slot dies
    store.move("c", "c2", mtime=7.0)
    store.copy_vectors(_row("a-copy"), store.get("a").slot)
    assert store.remove(["a", "missing"]) == 1
    expected = {"b": v[3], "c2": v[2], "a-copy": v[0]}
    for before_compact in (True, False):
        got = _by_path(store)
        assert got.keys() == expected.keys()
        for path, vectors in expected.items():
            np.testing.assert_array_equal(got[path], vectors.astype(np.float16))
        if before_compact:
            assert store.meta().slots == 5
            store.compact()
    assert store.meta().slots == 3 and list(store.live_slots()) == [0, 1, 2]
    assert store.get("c2").mtime == 7.0 and store.get("b").hash == "h2"


def test_where_filters_by_caption_and_path_glob(store):
    store.add(
        [
            _row("/p/dog.jpg", caption="A Dog on a BEACH"),
            _row("/q/cat.png", caption="a cat"),
            _row("/p/x.jpg"),
        ],
        _vectors(3),
    )
    assert [r.path for r in store.rows(Where(caption="beach"))] == ["/p/dog.jpg"]
    assert [r.path for r in store.rows(Where(path="/p/*"))] == ["/p/dog.jpg", "/p/x.jpg"]
    assert list(store.live_slots(Where(path="*.png"))) == [1]
    assert store.rows(Where(caption="'; DROP TABLE images; --")) == []
    assert len(store) == 3


def test_bind_refuses_another_shape_or_checkpoint(store):
    store.bind(Q, D, "tiny", "")  # embeddings made elsewhere: no fingerprint to compare
    with pytest.raises(IndexMismatchError, match="4x8"):
        store.bind(Q, D * 2, "other", "fp1")
    with pytest.raises(IndexMismatchError, match="fp2"):
        store.bind(Q, D, "other", "fp2")
    with pytest.raises(IndexMismatchError, match="shape"):
        store.add([_row("a")], _vectors(1)[:, :2])


def test_bad_rows_and_vectors_are_refused(store):
    with pytest.raises(InputError, match="NUL"):
        store.add([_row("a\x00b")], _vectors(1))
    with pytest.raises(InputError, match="twice"):
        store.add([_row("a"), _row("a")], _vectors(2))
    with pytest.raises(InputError, match="finite"):
        store.add([_row("a")], np.full((1, Q, D), np.nan, np.float32))
    assert len(store) == 0 and store.meta().slots == 0


def test_second_writer_is_busy_and_readers_are_read_only(store, tmp_path):
    with pytest.raises(IndexBusyError, match="a.idx"):
        open_store(tmp_path / "a.idx", writable=True, lock_timeout=0.05)
    with open_store(tmp_path / "a.idx") as reader, pytest.raises(InputError, match="read-only"):
        reader.remove(["a"])
    store.close()
    open_store(tmp_path / "a.idx", writable=True).close()  # the lock went with close()


def test_missing_or_foreign_paths_are_index_file_errors(tmp_path):
    with pytest.raises(IndexFileError, match="no such index"):
        open_store(tmp_path / "none.idx")
    (tmp_path / "file").write_text("x")
    for writable in (False, True):
        with pytest.raises(IndexFileError, match="a directory"):
            open_store(tmp_path / "file", writable=writable)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.jpg").write_text("x")
    with pytest.raises(IndexFileError, match="not empty"):
        open_store(tmp_path / "photos", writable=True)
