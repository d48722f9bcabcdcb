"""The index store: rows and vectors round-trip, replace/move/copy/remove/compact keep rows and vectors
together, filters, binding, and every crafted file refused with an IndexFileError naming it."""

from __future__ import annotations

import fnmatch
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from store_writer import expected_vectors

import blip2
from blip2.errors import IndexBusyError, IndexFileError, IndexMismatchError, InputError
from blip2.index.store import NewRow, Store, Where, open_store

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


def test_a_reader_keeps_its_snapshot_through_a_compaction(store, tmp_path):
    v = _vectors(4)
    store.add([_row("a"), _row("b"), _row("c"), _row("d")], v)
    with open_store(tmp_path / "a.idx") as reader:
        store.remove(["a", "c"])
        store.compact()
        assert [r.path for r in store.rows()] == ["b", "d"] and store.meta().slots == 2
        assert [(r.path, r.slot) for r in reader.rows()] == [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
        np.testing.assert_array_equal(reader.vectors(), v.astype(np.float16))  # the old file, still mapped
        reader.refresh()
        assert [(r.path, r.slot) for r in reader.rows()] == [("b", 0), ("d", 1)]
        np.testing.assert_array_equal(reader.vectors(), v[[1, 3]].astype(np.float16))
    assert sorted(p.name for p in (tmp_path / "a.idx").glob("vectors*")) == ["vectors.1.f16"]


def test_vector_files_a_crashed_compaction_left_are_removed_by_the_next_writer(store, tmp_path):
    store.add([_row("a"), _row("b")], _vectors(2))
    store.remove(["a"])
    store.close()
    index = tmp_path / "a.idx"
    (index / "vectors.1.f16").write_bytes(b"\0" * 100)  # written, never committed
    with open_store(index) as reader:  # a reader ignores it and changes nothing
        assert reader.vectors().shape == (2, Q, D)
    with open_store(index, writable=True) as writer:
        assert sorted(p.name for p in index.glob("vectors*")) == ["vectors.f16"]
        writer.compact()
        assert writer.get("b").slot == 0
    (index / "vectors.f16").write_bytes(b"\0" * 100)  # committed away, not yet unlinked
    open_store(index, writable=True).close()
    assert sorted(p.name for p in index.glob("vectors*")) == ["vectors.1.f16"]


def test_refresh_sees_new_rows_and_keeps_its_caches_when_nothing_changed(store, tmp_path):
    store.add([_row("a")], _vectors(1))
    with open_store(tmp_path / "a.idx") as reader:
        slots, vectors = reader.live_slots(), reader.vectors()
        reader.refresh()
        assert reader.live_slots() is slots and reader.vectors() is vectors
        store.add([_row("b")], _vectors(1, seed=1))
        assert len(reader) == 1  # still the old snapshot
        reader.refresh()
        assert (
            len(reader) == 2 and list(reader.live_slots()) == [0, 1] and reader.vectors().shape == (2, Q, D)
        )


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
    updated = store.meta().updated
    store.bind(Q, D, "tiny", "")  # embeddings made elsewhere: no fingerprint to compare
    store.bind(Q, D, "tiny", "fp1")
    assert store.meta().updated == updated  # nothing changed, nothing written
    with pytest.raises(IndexMismatchError, match="4x8"):
        store.bind(Q, D * 2, "other", "fp1")
    with pytest.raises(IndexMismatchError, match="fp2"):
        store.bind(Q, D, "other", "fp2")
    with pytest.raises(IndexMismatchError, match="shape"):
        store.add([_row("a")], _vectors(1)[:, :2])
    meta = store.meta()
    assert (meta.num_query, meta.dim, meta.model, meta.fingerprint) == (Q, D, "tiny", "fp1")


def test_a_first_fingerprint_fills_an_empty_one(tmp_path):
    with open_store(tmp_path / "a.idx", writable=True) as store:
        store.bind(Q, D, "", "")  # add-embeddings without a model
        store.bind(Q, D, "tiny", "fp1")
        assert (store.meta().model, store.meta().fingerprint) == ("tiny", "fp1")
        with pytest.raises(IndexMismatchError, match="fp1"):
            store.bind(Q, D, "other", "fp2")


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


# --- real processes: kill -9, two writers, readers during writes ------------------------------------------

WRITER = Path(__file__).with_name("store_writer.py")


def _start_writer(index: Path, first: int, count: int, batch: int, *options: str) -> subprocess.Popen:
    src = str(Path(blip2.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(WRITER), str(index), str(first), str(count), str(batch), *options]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """The writer's exit status (0 done, 3 busy) and its stderr."""
    _, err = process.communicate(timeout=timeout)
    assert process.returncode in (0, 3), err
    return process.returncode, err


def _wait_for(file: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not file.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{file} never appeared"
        time.sleep(0.02)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()


def _assert_consistent(index: Path, paths: set[str] | None = None) -> None:
    """Every live row has its own path's vectors, one row per path, and the counts agree."""
    with open_store(index) as store:
        rows, vectors = store.rows(), store.vectors()
        assert len(rows) == len(store) == len(store.live_slots()) == store.meta().count
        assert len({r.path for r in rows}) == len(rows) and len({r.slot for r in rows}) == len(rows)
        for r in rows:
            assert r.hash == f"hash-{r.path}"
            np.testing.assert_array_equal(vectors[r.slot], expected_vectors(r.path), err_msg=r.path)
        if paths is not None:
            assert {r.path for r in rows} == paths


def test_kill_between_fsync_and_commit_loses_only_that_batch(tmp_path):
    index = tmp_path / "a.idx"
    writer = _start_writer(index, 0, 40, 10, "--pause-at", "2")
    _wait_for(tmp_path / "a.idx.paused", writer)
    _kill(writer)
    slot_bytes = Q * D * 2
    assert (index / "vectors.f16").stat().st_size == 30 * slot_bytes  # batch 2's vectors are on disk...
    _assert_consistent(index, {f"p{i}" for i in range(20)})  # ...but only batches 0 and 1 are rows
    assert _finish(_start_writer(index, 0, 40, 10))[0] == 0  # the resumed add completes the rest
    _assert_consistent(index, {f"p{i}" for i in range(40)})
    with open_store(index) as store:  # the tail was dropped, not skipped: no hole, no duplicate
        assert store.meta().slots == 40 and (index / "vectors.f16").stat().st_size == 40 * slot_bytes


def test_kill_at_random_moments_never_corrupts(tmp_path):
    index, rng = tmp_path / "a.idx", np.random.default_rng(0)
    for _ in range(6):  # each round commits at most 40 batches of 7: the writer is always still at work
        writer = _start_writer(index, 0, 3000, 7)
        for _ in range(int(rng.integers(1, 40))):
            assert writer.stdout is not None and writer.stdout.readline(), writer.communicate()
        time.sleep(float(rng.uniform(0, 0.01)))  # somewhere inside a later batch
        assert writer.poll() is None
        _kill(writer)
        _assert_consistent(index)
    assert _finish(_start_writer(index, 0, 3000, 500))[0] == 0
    _assert_consistent(index, {f"p{i}" for i in range(3000)})


def test_two_writers_one_waits_the_other_is_busy(tmp_path):
    index = tmp_path / "a.idx"
    holder = _start_writer(index, 0, 20, 10, "--pause-at", "1")
    _wait_for(tmp_path / "a.idx.paused", holder)
    busy = _start_writer(index, 100, 10, 10, "--timeout", "0.2")
    status, message = _finish(busy)
    assert status == 3 and "another process is writing" in message and str(index) in message
    with pytest.raises(IndexBusyError, match=str(index)):
        open_store(index, writable=True, lock_timeout=0.1)
    waiter = _start_writer(index, 100, 10, 10, "--timeout", "60")
    time.sleep(0.5)
    assert waiter.poll() is None  # still waiting for the lock
    _kill(holder)  # the kernel releases a dead process's flock
    assert _finish(waiter)[0] == 0
    _assert_consistent(index, {f"p{i}" for i in range(10)} | {f"p{i}" for i in range(100, 110)})


def test_concurrent_writers_both_complete(tmp_path):
    index = tmp_path / "a.idx"
    open_store(index, writable=True).close()
    writers = [_start_writer(index, first, 400, 20, "--timeout", "60") for first in (0, 1000)]
    assert [_finish(w)[0] for w in writers] == [0, 0]
    _assert_consistent(index, {f"p{i}" for i in (*range(400), *range(1000, 1400))})


def test_readers_see_consistent_snapshots_while_a_writer_writes(tmp_path):
    index = tmp_path / "a.idx"
    _finish(_start_writer(index, 0, 10, 10))
    writer = _start_writer(index, 10, 2000, 13)
    seen = set()
    with open_store(index) as reader:
        while writer.poll() is None:
            reader.refresh()
            rows, vectors = reader.rows(), reader.vectors()
            assert len(rows) == len(reader.live_slots()) == reader.meta().count <= len(vectors)
            for r in rows[-20:]:
                np.testing.assert_array_equal(vectors[r.slot], expected_vectors(r.path))
            seen.add(len(rows))
    assert _finish(writer)[0] == 0
    assert len(seen) > 2  # the reader did look while rows were being added
    _assert_consistent(index, {f"p{i}" for i in range(2010)})


# --- crafted files ------------------------------------------------------------------------------------------


@pytest.fixture
def good_index(tmp_path):
    """A sound index of three rows, closed, to corrupt."""
    index = tmp_path / "a.idx"
    with open_store(index, writable=True) as store:
        store.bind(Q, D, "tiny", "fp1")
        store.add([_row("a"), _row("b"), _row("c")], _vectors(3))
    return index


def _sql(index: Path, *statements: str) -> None:
    db = sqlite3.connect(index / "index.sqlite", isolation_level=None)
    for statement in statements:
        db.execute(statement)
    db.close()


CRAFTED_DATABASES = {
    "format": ("UPDATE meta SET value = 'other/9' WHERE key = 'format'",),
    "no meta key": ("DELETE FROM meta WHERE key = 'slots'",),
    "huge num_query": ("UPDATE meta SET value = '1000000000' WHERE key = 'num_query'",),
    "negative dim": ("UPDATE meta SET value = '-8' WHERE key = 'dim'",),
    "dim without num_query": ("UPDATE meta SET value = '' WHERE key = 'num_query'",),
    "slots not a number": ("UPDATE meta SET value = '3x' WHERE key = 'slots'",),
    "slots past the file": ("UPDATE meta SET value = '1000000000000' WHERE key = 'slots'",),
    "created not finite": ("UPDATE meta SET value = 'nan' WHERE key = 'created'",),
    "vectors outside": ("UPDATE meta SET value = '../../x.f16' WHERE key = 'vectors'",),
    "negative slot": ("UPDATE images SET slot = -1 WHERE path = 'a'",),
    "slot past the committed ones": ("UPDATE images SET slot = 3 WHERE path = 'c'",),
    "dead slot past the committed ones": ("INSERT INTO dead(slot) VALUES (3)",),
    "missing table": ("DROP TABLE images",),
    "extra table": ("CREATE TABLE x(y)",),
    "a trigger": ("CREATE TRIGGER t AFTER DELETE ON images BEGIN DELETE FROM meta; END",),
    "a view": ("CREATE VIEW v AS SELECT 1",),
    "no unique slots": (
        "DROP TABLE images",
        "CREATE TABLE images(id INTEGER PRIMARY KEY, path TEXT, hash TEXT, size INTEGER, mtime REAL,"
        " width INTEGER, height INTEGER, slot INTEGER, caption TEXT, added REAL)",
        "INSERT INTO images VALUES (1, 'a', 'h', 1, 1.0, 1, 1, 0, NULL, 1.0), (2, 'b', 'h', 1, 1.0, 1, 1, 0, NULL, 1.0)",
    ),
}


@pytest.mark.parametrize("writable", [False, True], ids=["reader", "writer"])
@pytest.mark.parametrize("craft", CRAFTED_DATABASES.values(), ids=CRAFTED_DATABASES.keys())
def test_crafted_database_is_refused_naming_it(good_index, craft, writable):
    _sql(good_index, *craft)
    with pytest.raises(IndexFileError, match=r"a\.idx/(index\.sqlite|vectors\.f16):"):
        open_store(good_index, writable=writable)


def test_rows_and_dead_slots_that_disagree_are_refused(good_index):
    _sql(good_index, "DELETE FROM images WHERE path = 'a'")  # a row gone without its slot marked dead
    with (
        open_store(good_index) as store,
        pytest.raises(IndexFileError, match="2 rows, but 3 slots are not dead"),
    ):
        store.live_slots()


def test_a_nul_in_a_stored_path_is_refused(good_index):
    _sql(good_index, "UPDATE images SET path = 'a' || char(0) || 'b' WHERE path = 'a'")
    with open_store(good_index) as store, pytest.raises(IndexFileError, match="NUL"):
        store.rows()


CRAFTED_FILES = {
    "not sqlite": lambda index: (index / "index.sqlite").write_bytes(b"#!/bin/sh\nrm -rf /\n" * 10),
    "empty database": lambda index: (index / "index.sqlite").write_bytes(b""),
    "sqlite symlink": lambda index: _replace_by_symlink(index / "index.sqlite"),
    "vectors symlink": lambda index: _replace_by_symlink(index / "vectors.f16"),
    "vectors missing": lambda index: (index / "vectors.f16").unlink(),
    "vectors short": lambda index: os.truncate(index / "vectors.f16", 3 * Q * D * 2 - 3),
    "vectors a folder": lambda index: ((index / "vectors.f16").unlink(), (index / "vectors.f16").mkdir()),
}


def _replace_by_symlink(file: Path) -> None:
    """`file` moved outside the index, a symlink left in its place."""
    outside = file.parent.parent / f"outside-{file.name}"
    file.rename(outside)
    file.symlink_to(outside)


@pytest.mark.parametrize("craft", CRAFTED_FILES.values(), ids=CRAFTED_FILES.keys())
def test_crafted_files_are_refused_naming_them(good_index, craft):
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        assert not (good_index / name).exists()  # the last close checkpointed: index.sqlite is complete
    craft(good_index)
    for writable in (False, True):
        with pytest.raises(IndexFileError, match=r"a\.idx/(index\.sqlite|vectors\.f16):"):
            open_store(good_index, writable=writable)


def test_a_crash_tail_is_ignored_by_readers_and_dropped_by_the_writer(good_index):
    with open(good_index / "vectors.f16", "ab") as f:
        f.write(b"\x7f" * (Q * D * 2 + 5))  # a batch that never committed, cut mid-slot
    with open_store(good_index) as reader:
        assert reader.vectors().shape == (3, Q, D)
    with open_store(good_index, writable=True) as store:
        store.add([_row("d")], _vectors(1, seed=1))
        assert store.get("d").slot == 3
        np.testing.assert_array_equal(store.vectors()[3], _vectors(1, seed=1)[0].astype(np.float16))
    assert (good_index / "vectors.f16").stat().st_size == 4 * Q * D * 2


def test_text_that_is_not_utf8_is_an_input_error(store):
    store.add([_row("a")], _vectors(1))
    name = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")  # a Latin-1 file name, as os.listdir gives it
    with pytest.raises(InputError, match="not UTF-8"):
        store.add([_row(name)], _vectors(1))
    for call in (lambda: store.get(name), lambda: store.remove([name]), lambda: store.move("a", name, 1.0)):
        with pytest.raises(InputError, match="not UTF-8"):
            call()
    assert [r.path for r in store.rows()] == ["a"]


def test_moving_a_row_onto_itself_unchanged_writes_nothing(store):
    store.add([_row("a")], _vectors(1))
    updated = store.meta().updated
    store.move("a", "a", mtime=1.5)
    assert store.meta().updated == updated
    store.move("a", "a", mtime=2.5)
    assert store.meta().updated > updated and store.get("a").mtime == 2.5
    with pytest.raises(InputError, match="not in the index"):
        store.move("missing", "b", mtime=1.0)


GLOB_PATHS = [
    "/p/dog.jpg",
    "/p/x.jpg",
    "/q/cat.png",
    "/p/[a].jpg",
    "/p/a]b.jpg",
    "/p/!x.jpg",
    "/P/DOG.JPG",
    "/é/ü.jpg",
]
GLOB_PATTERNS = ["/p/*", "*.jpg", "/p/?.jpg", "/p/[dx]*", "/p/[!dx]*", "/p/[]a]*", "/p/[!]]*", "/p/[a", "*[a]*",
                 "/p/[[]a]*", "/?/*", "/[é]/*", "*]*", "", "*", "/p/[a-d]og.jpg", "/p/[!a-z]*"]  # fmt: skip


def test_path_glob_is_exactly_fnmatch(store):
    """SQLite's GLOB prefilter never drops a row fnmatch keeps (nor keeps one it drops)."""
    store.add([_row(p) for p in GLOB_PATHS], _vectors(len(GLOB_PATHS)))
    for pattern in GLOB_PATTERNS:
        expected = [p for p in GLOB_PATHS if fnmatch.fnmatchcase(p, pattern)]
        assert [r.path for r in store.rows(Where(path=pattern))] == expected, pattern


def test_index_paths_with_uri_characters(tmp_path):
    """The database is opened through an SQLite URI: ?, #, % and spaces in the path are quoted."""
    index = tmp_path / "a b?mode=rwc#x%20.idx"
    with open_store(index, writable=True) as store:
        store.bind(Q, D, "", "")
        store.add([_row("a")], _vectors(1))
    with open_store(index) as reader:
        assert [r.path for r in reader.rows()] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [index.name]
    with pytest.raises(InputError, match="NUL"):
        open_store(str(tmp_path / "a\x00b"))


def test_a_snapshot_whose_vector_file_vanished_is_taken_again(store, tmp_path, monkeypatch):
    """A compaction can commit and unlink the old vector file between a reader's BEGIN and its open."""
    store.add([_row("a"), _row("b")], _vectors(2))
    with open_store(tmp_path / "a.idx") as reader:
        store.remove(["a"])
        store.compact()
        real, calls = Store._open_vectors, []

        def vanishing(self, **options):
            calls.append(self._meta["vectors"])
            if len(calls) == 1:
                raise FileNotFoundError(self._meta["vectors"])
            return real(self, **options)

        monkeypatch.setattr(Store, "_open_vectors", vanishing)
        reader.refresh()
        assert calls == ["vectors.1.f16", "vectors.1.f16"]
        np.testing.assert_array_equal(reader.vectors(), _vectors(2)[1:].astype(np.float16))


def test_a_refresh_onto_an_unsound_state_closes_the_reader(store, tmp_path):
    store.add([_row("a")], _vectors(1))
    with open_store(tmp_path / "a.idx") as reader:
        _sql(
            tmp_path / "a.idx", "UPDATE meta SET value = '99' WHERE key = 'slots'"
        )  # behind the writer's back
        with pytest.raises(IndexFileError, match="shorter than its 99 committed slots"):
            reader.refresh()
        with pytest.raises(InputError, match="closed"):
            reader.rows()


def test_rows_for_slots_keep_the_order_given_and_leave_out_dead_slots(store):
    store.add([_row(f"p{i}") for i in range(1000)], _vectors(1000))  # more slots than one IN list takes
    store.remove(["p5"])
    wanted = [999, 5, 0, 950, 3]
    assert [r.path for r in store.rows_for_slots(np.array(wanted))] == ["p999", "p0", "p950", "p3"]
    assert len(store.rows_for_slots(range(1000))) == 999


def test_copy_vectors_needs_a_committed_slot_and_disk_bytes_counts_the_files(store, tmp_path):
    store.add([_row("a")], _vectors(1))
    for slot in (-1, 1):
        with pytest.raises(InputError, match=f"no slot {slot}"):
            store.copy_vectors(_row("b"), slot)
    files = [p for p in (tmp_path / "a.idx").iterdir() if p.name != "LOCK"]
    assert store.disk_bytes() == sum(p.stat().st_size for p in files) > Q * D * 2
