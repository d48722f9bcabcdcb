"""The search index's durable store: rows and metadata in SQLite, fp16 vectors in a memory-mapped file.

An index is a directory:
- `index.sqlite`: the `meta` key/value table and one `images` row per image (path, content hash, file facts,
  caption, and the `slot` where its vectors live), every change in one transaction.
- `vectors.f16` (after `compact()`, `vectors.N.f16`; `meta.vectors` names the current one): raw little-endian
  float16, slot-major (slots, Q, D), the L2-normalised projected query embeddings. Append-only; a removed row's
  slot is dead until `compact()`. `meta.slots` counts the committed slots; bytes past them are a crash tail.
- `LOCK`: a writer holds an exclusive `flock` on it for as long as its store is open. Readers take no lock.

Adding a batch (under the lock): truncate the vector file to the committed slots (drops a crash tail), append
the batch's vectors and fsync, then insert the rows and advance `meta.slots` in one transaction. A `kill -9`
anywhere leaves either the batch committed or an uncommitted tail the next writer drops: never a row without
its vectors, never a duplicate. Slots only grow, so a mapped region is never truncated under a reader.

A reader works on one SQLite snapshot (a read transaction held from open or `refresh()`), so its rows, slots
and vectors agree with each other while a writer commits; `compact()` writes a new vector file under a new name
and leaves the old one to readers that still map it.

Every file is hostile input: the schema must be exactly ours (no triggers, views or extra tables), meta values
are parsed and bounded, slots are checked against the vector file's size before anything is mapped, symlinks
are refused, readers open the database read-only, and SQL takes its values as parameters only.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import mmap
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexBusyError, IndexFileError, IndexMismatchError, InputError
from .resident import populate_in_background

FORMAT = "blip2-index/2"
OLD_FORMAT = "blip2-index/1"  # before source/key/locator: read as is, migrated by the first writer
DATABASE = "index.sqlite"
LOCK = "LOCK"
FIRST_VECTORS = "vectors.f16"
ANN_FILES = ("ann.faiss", "ann.json")  # the ANN cache (blip2.index.ann): dropped when slots are renumbered
MAX_NUM_QUERY = 1024  # released checkpoints: 32
MAX_DIM = 16384  # released checkpoints: 256
_VECTORS_NAME = re.compile(r"vectors(?:\.([1-9][0-9]{0,8}))?\.f16")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_CHUNK_SLOTS = 4096  # compaction copies this many slots at a time (64 MiB at Q=32, D=256)
_SQL_VARIABLES = 900  # per `IN (...)` list: under every SQLite's variable limit
# The writer's SQLite durability, with WAL. Both FULL and NORMAL survive a `kill -9` (a commit is in the OS's
# cache either way); FULL also fsyncs the WAL at each commit, so the rows `add` has returned survive a power
# cut too. Measured (benchmarks/index_store_speed.py, 32x256, 16k rows, best of 5, 2-core VM at load ~10):
# FULL costs one fsync per commit, ~11 ms here: 9.7k against 16.8k rows/s at batches of 256, 12.6k against
# 13.9k at 4,096. Both are far above what the model embeds (and the 1,500/s build target), so FULL.
SYNCHRONOUS = "FULL"

_SCHEMA_V1 = (
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
    "CREATE TABLE images(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, "
    "size INTEGER NOT NULL, mtime REAL NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, "
    "slot INTEGER UNIQUE NOT NULL, caption TEXT, added REAL NOT NULL) STRICT",
    "CREATE INDEX images_hash ON images(hash)",
    # The slots of removed or replaced rows, so that the live ones are all slots but these (a search needs
    # them per snapshot: reading 1M slots out of `images` takes ~0.5 s, this a few ms).
    "CREATE TABLE dead(slot INTEGER PRIMARY KEY) STRICT",
)
# Format 2: an image inside a tar shard or a table is located by its `source` file, its `key` there and a
# `locator` (JSON: where its bytes are, see blip2.index.locating); all three NULL for an image file. A new
# index is made as format 1 and migrated, so that new and migrated databases have one schema text.
_MIGRATION_V2 = (
    "ALTER TABLE images ADD COLUMN source TEXT",
    "ALTER TABLE images ADD COLUMN key TEXT",
    "ALTER TABLE images ADD COLUMN locator TEXT",
    "CREATE INDEX images_source ON images(source)",
    # The shards and bytes tables read completely (every member indexed, none failed) at this size and mtime:
    # one found so again is not read at all.
    "CREATE TABLE sources(source TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime REAL NOT NULL) STRICT",
)
_FORMATS = {OLD_FORMAT: _SCHEMA_V1, FORMAT: _SCHEMA_V1 + _MIGRATION_V2}
# A Row's fields in order, per format (format 1 has no locating columns: NULL).
_ROW_COLUMNS = "path, hash, size, mtime, width, height, caption, source, key, locator, slot, added"
_OLD_ROW_COLUMNS = "path, hash, size, mtime, width, height, caption, NULL, NULL, NULL, slot, added"
MAX_LOCATOR_CHARS = 4096  # a locator is a few numbers and names


@dataclass(frozen=True)
class NewRow:
    """An image to add: its path (as the caller keys it), content hash and file facts; for an image inside a
    tar shard or a table, the `source` file, its `key` there and its `locator` (JSON text), and `path` its
    display name `SOURCE#KEY`."""

    path: str
    hash: str
    size: int
    mtime: float
    width: int
    height: int
    caption: str | None = None
    source: str | None = None
    key: str | None = None
    locator: str | None = None


@dataclass(frozen=True, kw_only=True)
class Row(NewRow):
    """A stored image: a `NewRow`'s fields plus the slot of its vectors and when it was added (Unix time)."""

    slot: int
    added: float


@dataclass(frozen=True)
class Meta:
    """What the index holds: the embedding shape and checkpoint it is bound to (None/"" before the first
    `bind`), times (Unix seconds), live rows (`count`) and slots in the vector file, dead ones included."""

    num_query: int | None
    dim: int | None
    model: str
    fingerprint: str
    created: float
    updated: float
    count: int
    slots: int = 0


@dataclass(frozen=True)
class Where:
    """A filter on rows: `caption` a case-insensitive substring of the caption, `path` a glob (fnmatch, case
    sensitive, `*` crosses `/`) over the stored path. Both given: both must hold."""

    caption: str | None = None
    path: str | None = None


def open_store(
    path: str | os.PathLike[str], writable: bool = False, lock_timeout: float = 0.0, resident: bool = False
) -> Store:
    """Open the index directory `path`.

    writable=True creates the directory when missing (or adopts an empty one) and takes the writer lock,
    waiting up to `lock_timeout` seconds for another writer before an `IndexBusyError`. writable=False opens
    an existing index read-only, on a snapshot (see `Store.refresh`). Anything that is not a sound index is an
    `IndexFileError` naming the file at fault. resident=True: each mapping of the vectors is faulted in by a
    background thread (`blip2.index.resident`), for a long-lived searcher."""
    directory = Path(os.fspath(path))
    if "\x00" in str(directory):
        raise InputError(f"{str(directory)!r}: an index path cannot contain a NUL character")
    if writable:
        _make_directory(directory)
    else:
        _check_directory(directory)
    lock = _take_lock(directory, lock_timeout) if writable else None
    try:
        db = _connect(directory, writable)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return Store(directory, db, lock, resident)


class Store:
    """An open index directory; see the module docstring. A context manager: `close()` releases the lock."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock: int | None, resident: bool = False):
        """Take over an open connection and, for a writer, the locked LOCK descriptor (closed on failure);
        `resident`: see `open_store`."""
        self.path = path
        self.writable = lock is not None
        self.resident = resident
        self._db = connection
        self._lock_fd = lock
        self._mutex = threading.RLock()  # one statement at a time on the shared connection
        self._meta: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}  # per snapshot: the live slots, the mapped vectors
        self._vectors_fd: int | None = None  # a reader's: the snapshot's vector file, however it is renamed
        try:
            with self._guard():
                if self.writable:
                    _create_or_check_schema(self._db, self._db_file)
                    self._meta = _read_meta(self._db, self._db_file)
                    self._check_slots()
                    if self._meta["slots"]:
                        os.close(self._open_vectors())
                    self._remove_orphans()
                else:
                    self._begin_snapshot()
        except BaseException:
            self.close()
            raise

    # --- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and the vector file and release the writer lock. Arrays from `vectors()` stay
        valid (they hold their own mapping)."""
        with self._mutex:
            self._drop_cache()
            if self._vectors_fd is not None:
                os.close(self._vectors_fd)
                self._vectors_fd = None
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def refresh(self) -> None:
        """A reader: move to the latest committed state (a new snapshot; cheap when nothing changed). A writer
        always sees it. If the new state is unsound, the error is raised and the store closed. A long-lived
        reader should refresh now and then: SQLite cannot recycle its WAL past a snapshot still open."""
        if self.writable:
            return
        try:
            with self._guard():
                self._begin_snapshot()
        except BaseException:
            self.close()
            raise

    # --- reading ---------------------------------------------------------------------------------------------

    def meta(self) -> Meta:
        """The index's metadata and live row count."""
        m = self._meta
        return Meta(
            m["num_query"],
            m["dim"],
            m["model"],
            m["fingerprint"],
            m["created"],
            m["updated"],
            len(self),
            m["slots"],
        )

    def __len__(self) -> int:
        """The number of live rows."""
        return len(self.live_slots())

    def get(self, path: str) -> Row | None:
        """The row stored under `path`, or None."""
        rows = self._select("WHERE path = ?", (path,))
        return rows[0] if rows else None

    def by_source(self, source: str) -> list[Row]:
        """The rows of the images inside the tar shard or table `source` (as stored: absolute), by slot."""
        if self._meta["format"] != FORMAT:
            return []  # format 1 has no sources (read as is until a writer migrates it)
        return self._select("WHERE source = ? ORDER BY slot", (source,))

    def source_read(self, source: str) -> tuple[int, float] | None:
        """(size, mtime) of the shard or bytes table `source` when it was last read completely, or None."""
        if self._meta["format"] != FORMAT:
            return None
        with self._guard():
            found = self._db.execute("SELECT size, mtime FROM sources WHERE source = ?", (source,)).fetchone()
        if found is not None and tuple(map(type, found)) != (int, float):
            raise self._corrupt(f"a malformed sources row ({str(found)[:200]})")
        return found

    def set_source_read(self, source: str, size: int | None, mtime: float = 0.0) -> None:
        """Record that `source` was read completely at `size` and `mtime` (None: forget it, to be read again)."""
        self._require_writable()
        with self._transaction() as db:
            db.execute("DELETE FROM sources WHERE source = ?", (source,))
            if size is not None:
                db.execute("INSERT INTO sources(source, size, mtime) VALUES (?, ?, ?)", (source, size, mtime))

    def by_hash(self, hash: str) -> list[Row]:
        """The rows whose content hash is `hash` (copies of one file), by slot."""
        return self._select("WHERE hash = ? ORDER BY slot", (hash,))

    def rows(self, where: Where | None = None) -> list[Row]:
        """The live rows (those matching `where`), by slot."""
        clause, params = _where_sql(where)
        return self._select(f"{clause} ORDER BY slot", params)

    def live_slots(self, where: Where | None = None) -> np.ndarray:
        """The slots of the live rows (those matching `where`): int64, sorted ascending. Cached per snapshot
        without a filter, so a search pays for it once."""
        if where is None:
            if "live" not in self._cache:
                self._cache["live"] = self._live_slots()
            return self._cache["live"]
        clause, params = _where_sql(where)
        slots = self._slot_column(f"SELECT slot FROM images {clause} ORDER BY slot", params)
        if len(slots) and (slots[0] < 0 or slots[-1] >= self._meta["slots"] or np.any(np.diff(slots) <= 0)):
            raise self._corrupt("slots out of range or repeated")
        return slots

    def rows_for_slots(self, slots: Sequence[int] | np.ndarray) -> list[Row]:
        """The live rows at `slots`, in the order given; a slot without a live row is left out."""
        wanted = [int(s) for s in slots]
        found = {r.slot: r for r in self._select_in("slot", wanted)}
        return [found[s] for s in wanted if s in found]

    def vectors(self) -> np.ndarray:
        """The committed slots' vectors: a read-only array (slots, Q, D) float16 mapped from the vector file
        (dead slots included; index it with `live_slots()`). Empty (0, Q, D) when there are none."""
        if "vectors" not in self._cache:
            with self._guard():
                self._cache["vectors"] = self._map_vectors()
                if self.resident and len(self._cache["vectors"]):
                    self._cache["resident"] = populate_in_background(self._cache["vectors"])
        return self._cache["vectors"]

    def _drop_cache(self) -> None:
        """Forget this snapshot's live slots and mapping, stopping the thread that faults the mapping in."""
        if "resident" in self._cache:
            self._cache["resident"][1].set()
        self._cache.clear()

    def disk_bytes(self) -> int:
        """The bytes the index directory's files take (database, its journal, vectors, ANN cache)."""
        total = 0
        for name in (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", self._meta["vectors"], *ANN_FILES):
            try:
                total += os.lstat(self.path / name).st_size
            except FileNotFoundError:
                pass
        return total

    # --- writing ---------------------------------------------------------------------------------------------

    def bind(self, num_query: int, dim: int, model: str, fingerprint: str) -> None:
        """Fix the embedding shape and checkpoint on first use; afterwards a different shape, or a different
        non-empty fingerprint, is an `IndexMismatchError`. An empty fingerprint (embeddings made elsewhere)
        matches any; a known one fills an empty one."""
        self._require_writable()
        _check_shape(num_query, dim)
        m = self._meta
        if m["num_query"] is not None and (m["num_query"], m["dim"]) != (num_query, dim):
            raise IndexMismatchError(
                f"{self.path}: the index holds {m['num_query']}x{m['dim']} embeddings"
                f" ({m['model'] or 'no model'}), not {num_query}x{dim} ({model or 'no model'})"
            )
        if m["fingerprint"] and fingerprint and m["fingerprint"] != fingerprint:
            raise IndexMismatchError(
                f"{self.path}: the index was made with checkpoint {m['model'] or '?'} (fingerprint"
                f" {m['fingerprint']}), not {model or '?'} (fingerprint {fingerprint})"
            )
        changes = {"num_query": str(num_query), "dim": str(dim)}
        if fingerprint and not m["fingerprint"]:
            changes |= {"fingerprint": fingerprint, "model": model}
        elif model and not m["model"]:
            changes["model"] = model
        changes = {key: value for key, value in changes.items() if str(m[key]) != value}
        if changes:  # an index already bound this way costs no transaction
            with self._transaction() as db:
                _write_meta(db, changes)

    def add(self, rows: Sequence[NewRow], vectors: np.ndarray) -> list[int]:
        """Store `rows` with their vectors (n, Q, D) float16/float32 in one transaction and return their slots.
        A path already present is replaced (its old slot dies). The store must be bound to (Q, D)."""
        self._require_writable()
        data = self._check_vectors(vectors, len(rows))
        _check_new_rows(rows)
        if not rows:
            return []
        start = self._meta["slots"]
        self._append_vectors(start, data)
        slots = list(range(start, start + len(rows)))
        self._insert_rows(rows, slots)
        return slots

    def copy_vectors(self, row: NewRow, from_slot: int) -> int:
        """Add `row` with a copy of the vectors at `from_slot` (a copied file: nothing to re-embed)."""
        self._require_writable()
        if not 0 <= from_slot < self._meta["slots"]:
            raise InputError(f"{self.path}: no slot {from_slot} (the index has {self._meta['slots']})")
        source = np.array(self.vectors()[from_slot : from_slot + 1])
        return self.add([row], source)[0]

    def move(self, old_path: str, new_path: str, mtime: float) -> None:
        """Re-key the row at `old_path` to `new_path` (a moved file keeps its vectors). A row already at
        `new_path` is replaced. Nothing is written when nothing changes (an unchanged file re-added)."""
        _check_new_rows([NewRow(new_path, "", 0, mtime, 0, 0)])
        row = self.get(old_path)
        if row is None:
            raise InputError(f"{old_path}: not in the index {self.path}")
        self.relocate(
            old_path,
            NewRow(new_path, row.hash, row.size, mtime, 0, 0, None, row.source, row.key, row.locator),
        )

    def relocate(self, old_path: str, new: NewRow) -> None:
        """Re-key the row at `old_path` to `new`'s path and locating columns (source, key, locator), with its
        size and mtime; its hash, vectors, width, height and caption are kept (a moved file, an unchanged one
        touched, a shard member whose shard changed around it). A row already at the new path is replaced.
        Nothing is written when nothing changes."""
        self._require_writable()
        _check_new_rows([new])
        row = self.get(old_path)
        if row is None:
            raise InputError(f"{old_path}: not in the index {self.path}")
        located = (new.path, new.size, new.mtime, new.source, new.key, new.locator)
        if located == (row.path, row.size, row.mtime, row.source, row.key, row.locator):
            return
        with self._transaction() as db:
            if new.path != old_path:
                _delete_paths(db, [new.path])
            db.execute(
                "UPDATE images SET path = ?, size = ?, mtime = ?, source = ?, key = ?, locator = ? WHERE path = ?",
                (*located, old_path),
            )

    def touch(self, rows: Sequence[NewRow]) -> None:
        """Refresh the size, mtime and locating columns (source, key, locator) of rows stored at the same paths
        with the same content, in one transaction (unchanged files touched, the members of a shard rewritten
        around them); rows absent, or already so, are left alone (no transaction when none changes)."""
        self._require_writable()
        _check_new_rows(rows)
        fresh = [(r.size, r.mtime, r.source, r.key, r.locator, r.path) for r in rows]
        at = self._select_in("path", [r.path for r in rows])
        stored = {r.path: (r.size, r.mtime, r.source, r.key, r.locator, r.path) for r in at}
        changed = [values for values in fresh if values[-1] in stored and stored[values[-1]] != values]
        if changed:
            with self._transaction() as db:
                update = (
                    "UPDATE images SET size = ?, mtime = ?, source = ?, key = ?, locator = ? WHERE path = ?"
                )
                db.executemany(update, changed)

    def set_caption(self, path: str, caption: str) -> None:
        """Store `caption` for the row at `path`."""
        self._require_writable()
        with self._transaction() as db:
            if db.execute("UPDATE images SET caption = ? WHERE path = ?", (caption, path)).rowcount == 0:
                raise InputError(f"{path}: not in the index {self.path}")

    def remove(self, paths: Sequence[str]) -> int:
        """Remove the rows at `paths` (absent ones are ignored), and forget that their shards or tables were
        read completely; returns how many were removed."""
        self._require_writable()
        with self._transaction() as db:
            # a shard or table that loses a row is read again by the next add (see `source_read`)
            forget = "DELETE FROM sources WHERE source IN (SELECT source FROM images WHERE path = ?)"
            db.executemany(forget, [(p,) for p in paths])
            return _delete_paths(db, paths)

    def compact(self) -> None:
        """Rewrite the vectors without dead slots into a new file, renumber the rows' slots 0..n-1 in the same
        order, and drop the ANN cache (its ids are slots). Nothing to do when no slot is dead."""
        self._require_writable()
        live = self.live_slots()
        if len(live) == self._meta["slots"]:
            return
        for name in ANN_FILES:  # before the renumbering commits: a stale ANN file must never survive it
            _unlink(self.path / name)
        _fsync_directory(self.path)
        old = self._meta["vectors"]
        match = _VECTORS_NAME.fullmatch(old)
        new = f"vectors.{int((match and match.group(1)) or 0) + 1}.f16"
        self._write_compacted(self.path / new, live)
        with self._transaction() as db:
            moved = [(to, at) for to, at in enumerate(live.tolist()) if to != at]
            db.executemany("UPDATE images SET slot = ? WHERE slot = ?", moved)
            db.execute("DELETE FROM dead")
            _write_meta(db, {"slots": str(len(live)), "vectors": new})
        _unlink(self.path / old)  # readers that still map it keep their copy
        _fsync_directory(self.path)

    # --- internals -------------------------------------------------------------------------------------------

    @property
    def _db_file(self) -> Path:
        return self.path / DATABASE

    @property
    def _vectors_file(self) -> Path:
        return self.path / self._meta["vectors"]

    @property
    def _slot_bytes(self) -> int:
        return (self._meta["num_query"] or 0) * (self._meta["dim"] or 0) * 2

    def _corrupt(self, problem: str, file: Path | None = None) -> IndexFileError:
        return IndexFileError(str(file or self._db_file), problem)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """One thread at a time on the connection; SQLite's failures as errors naming the database."""
        if self._db is None:
            raise InputError(f"{self.path}: the index store is closed")
        with self._mutex:
            try:
                yield
            except sqlite3.DatabaseError as e:
                raise self._corrupt(f"database error ({e})") from None
            except UnicodeEncodeError as e:  # a str with lone surrogates: a file name that is not UTF-8
                raise InputError(f"{self.path}: {str(e.object)[:200]!r} is not UTF-8 text") from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that also stamps `updated`; the snapshot caches are dropped after it."""
        with self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                _write_meta(self._db, {"updated": repr(time.time())})
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._drop_cache()
            self._meta = _read_meta(self._db, self._db_file)

    def _require_writable(self) -> None:
        if not self.writable:
            raise InputError(f"{self.path}: the index is open read-only")
        if self._db is None:
            raise InputError(f"{self.path}: the index store is closed")

    def _begin_snapshot(self) -> None:
        """Start a read transaction and take this snapshot's meta and vector file (kept, with the caches, when
        nothing was committed since the last snapshot: every write transaction stamps `updated`)."""
        for attempt in range(3):  # a compaction may remove the snapshot's vector file between the two steps
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            meta = _read_meta(self._db, self._db_file)
            if meta == self._meta:
                return
            self._drop_cache()
            if self._vectors_fd is not None:
                os.close(self._vectors_fd)
                self._vectors_fd = None
            self._meta = meta
            self._check_slots()
            try:
                self._vectors_fd = self._open_vectors(missing_ok=attempt < 2) if meta["slots"] else None
                return
            except FileNotFoundError:
                self._meta = {}  # not taken: the next round must not find it unchanged

    def _live_slots(self) -> np.ndarray:
        """All committed slots but the dead ones; checked against the number of rows (a crafted file may
        disagree with itself)."""
        dead = self._slot_column("SELECT slot FROM dead ORDER BY slot", ())
        if len(dead) and (dead[0] < 0 or dead[-1] >= self._meta["slots"]):
            raise self._corrupt("dead slots out of range")
        live = np.delete(np.arange(self._meta["slots"], dtype=np.int64), dead)
        with self._guard():
            rows = self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        if rows != len(live):
            raise self._corrupt(f"{rows} rows, but {len(live)} slots are not dead")
        live.flags.writeable = False
        return live

    def _slot_column(self, sql: str, params: Sequence[Any]) -> np.ndarray:
        """The integers one query selects, as int64 (read-only)."""
        with self._guard():
            try:
                slots = np.fromiter((s for (s,) in self._db.execute(sql, params)), dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                raise self._corrupt("a slot that is not an integer") from None
        slots.flags.writeable = False
        return slots

    def _check_slots(self) -> None:
        """The rows' and dead slots lie within the committed slots (the vector file is checked when opened)."""
        m = self._meta
        if m["num_query"] is None and m["slots"]:
            raise self._corrupt("slots stored but no embedding size recorded")
        for table in ("images", "dead"):  # MIN and MAX each from the slot index: no scan of the table
            low = self._db.execute(f"SELECT MIN(slot) FROM {table}").fetchone()[0]
            high = self._db.execute(f"SELECT MAX(slot) FROM {table}").fetchone()[0]
            if low is not None and not (
                isinstance(low, int) and isinstance(high, int) and 0 <= low <= high < m["slots"]
            ):
                raise self._corrupt(f"{table} slots {low}..{high} outside the {m['slots']} committed slots")

    def _open_vectors(self, writable: bool = False, missing_ok: bool = False) -> int:
        """A descriptor on the vector file, checked: a regular file (not a symlink) that holds the committed
        slots. `writable` creates it if missing; else a missing one is an error, or with `missing_ok` the
        FileNotFoundError itself."""
        file, slots = self._vectors_file, self._meta["slots"]
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        try:
            fd = os.open(file, flags | _OPEN_FLAGS, 0o644)
        except FileNotFoundError:
            if missing_ok:
                raise
            raise self._corrupt(f"missing, but the index has {slots} slots", file) from None
        except OSError as e:
            raise self._corrupt(f"cannot be opened ({e.strerror or e}; a symlink is refused)", file) from None
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "not a regular file"
        elif info.st_size < slots * self._slot_bytes:
            problem = (
                f"{info.st_size} bytes, shorter than its {slots} committed slots of {self._slot_bytes} bytes"
            )
        if problem:
            os.close(fd)
            raise self._corrupt(problem, file)
        return fd

    def _map_vectors(self) -> np.ndarray:
        """The committed slots mapped read-only: a reader's from its snapshot's descriptor, a writer's afresh."""
        slots, q, d = self._meta["slots"], self._meta["num_query"] or 0, self._meta["dim"] or 0
        if slots == 0:
            return np.empty((0, q, d), dtype="<f2")
        own = self._vectors_fd is None
        fd = self._open_vectors() if self._vectors_fd is None else self._vectors_fd
        try:
            buffer = mmap.mmap(fd, slots * self._slot_bytes, access=mmap.ACCESS_READ)
        finally:
            if own:
                os.close(fd)
        return np.frombuffer(buffer, dtype="<f2").reshape(slots, q, d)

    def _check_vectors(self, vectors: np.ndarray, n: int) -> np.ndarray:
        """`vectors` as contiguous little-endian float16 (n, Q, D) of the bound shape, all finite."""
        m = self._meta
        array = np.asarray(vectors)
        expected = (n, m["num_query"], m["dim"])
        if m["num_query"] is None:
            raise InputError(f"{self.path}: bind the index to an embedding size before adding vectors")
        if array.shape != expected:
            raise IndexMismatchError(f"{self.path}: vectors of shape {array.shape}, expected {expected}")
        if array.dtype.kind != "f":
            raise InputError(f"{self.path}: vectors must be floating point, not {array.dtype}")
        data = np.ascontiguousarray(array, dtype="<f2")
        if not np.isfinite(data).all():
            raise InputError(f"{self.path}: vectors must be finite (NaN, infinity or beyond float16's range)")
        return data

    def _append_vectors(self, start: int, data: np.ndarray) -> None:
        """Drop any crash tail past slot `start`, append `data` there and make it durable."""
        created = not os.path.lexists(self._vectors_file)
        fd = self._open_vectors(writable=True)
        try:
            end = start * self._slot_bytes
            if os.fstat(fd).st_size != end:
                os.ftruncate(fd, end)  # the uncommitted tail of a batch that crashed
            _write_all(fd, data.data.cast("B"), end)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path)

    def _insert_rows(self, rows: Sequence[NewRow], slots: list[int]) -> None:
        """The rows at their slots and the new slot count, in one transaction (the commit point of `add`)."""
        now = time.time()
        values = [
            (
                r.path,
                r.hash,
                r.size,
                r.mtime,
                r.width,
                r.height,
                r.caption,
                r.source,
                r.key,
                r.locator,
                s,
                now,
            )
            for r, s in zip(rows, slots)
        ]
        marks = ", ".join("?" * len(values[0]))
        with self._transaction() as db:
            _delete_paths(db, [r.path for r in rows])
            db.executemany(f"INSERT INTO images({_ROW_COLUMNS}) VALUES ({marks})", values)
            _write_meta(db, {"slots": str(slots[-1] + 1)})

    def _write_compacted(self, file: Path, live: np.ndarray) -> None:
        vectors = self.vectors()
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN_FLAGS, 0o644)
        try:
            for start in range(0, len(live), _CHUNK_SLOTS):
                chunk = np.ascontiguousarray(vectors[live[start : start + _CHUNK_SLOTS]])
                _write_all(fd, chunk.data.cast("B"), start * self._slot_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(self.path)

    def _remove_orphans(self) -> None:
        """A writer drops vector files that no committed state names (a compaction that crashed)."""
        for entry in os.scandir(self.path):
            if _VECTORS_NAME.fullmatch(entry.name) and entry.name != self._meta["vectors"]:
                if entry.is_file(follow_symlinks=False):
                    _unlink(Path(entry.path))

    def _select_in(self, column: str, values: Sequence[Any]) -> list[Row]:
        """The rows whose `column` (a constant name) is one of `values`, a chunk of them per query."""
        found = []
        for start in range(0, len(values), _SQL_VARIABLES):
            part = values[start : start + _SQL_VARIABLES]
            found += self._select(f"WHERE {column} IN ({','.join('?' * len(part))})", part)
        return found

    def _select(self, clause: str, params: Sequence[Any]) -> list[Row]:
        with self._guard():
            columns = _ROW_COLUMNS if self._meta["format"] == FORMAT else _OLD_ROW_COLUMNS
            found = self._db.execute(f"SELECT {columns} FROM images {clause}", params).fetchall()
        return _rows(found, self._db_file)


# --- files and locks ----------------------------------------------------------------------------------------


def _check_directory(directory: Path) -> None:
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        raise IndexFileError(str(directory), "no such index") from None
    except OSError as e:
        raise IndexFileError(str(directory), f"cannot be read ({e.strerror or e})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise IndexFileError(str(directory), "not an index: an index is a directory")
    if not os.path.lexists(directory / DATABASE):
        raise IndexFileError(str(directory), f"not an index (no {DATABASE})")


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise IndexFileError(str(directory), "not an index: an index is a directory") from None
    except OSError as e:
        raise IndexFileError(str(directory), f"cannot be created ({e.strerror or e})") from None
    if not os.path.lexists(directory / DATABASE):
        strangers = sorted(set(os.listdir(directory)) - {LOCK})
        if strangers:  # e.g. the photo folder given as the index by mistake
            raise IndexFileError(
                str(directory), f"not an index (no {DATABASE}) and not empty ({strangers[0]}...)"
            )


def _take_lock(directory: Path, timeout: float) -> int:
    """An exclusive flock on the index's LOCK file, waiting up to `timeout` seconds."""
    import fcntl

    file = directory / LOCK
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    except OSError as e:
        raise IndexFileError(
            str(file), f"cannot be opened ({e.strerror or e}; a symlink is refused)"
        ) from None
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise IndexBusyError(
                    f"{directory}: another process is writing to this index (waited {timeout:g} s)"
                ) from None
            time.sleep(0.02)


def _connect(directory: Path, writable: bool) -> sqlite3.Connection:
    """The index database: read-write (created if missing) for the writer, read-only for readers."""
    file = directory / DATABASE
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            raise IndexFileError(str(file), "not a regular file (a symlink or special file)")
        if info.st_size:
            header = _read_head(file, len(_SQLITE_MAGIC))
            if header != _SQLITE_MAGIC:
                raise IndexFileError(str(file), "not an SQLite database")
    uri = f"file:{urllib.parse.quote(str(file.absolute()))}?mode={'rwc' if writable else 'ro'}"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA trusted_schema = OFF")  # no functions run from a crafted schema
        db.execute("PRAGMA busy_timeout = 10000")
        db.create_function("b2_contains", 2, _contains, deterministic=True)
        db.create_function("b2_glob", 2, _glob, deterministic=True)
    except sqlite3.DatabaseError as e:
        raise IndexFileError(str(file), f"cannot be opened ({e})") from None
    return db


def _read_head(file: Path, n: int) -> bytes:
    try:
        fd = os.open(file, os.O_RDONLY | _OPEN_FLAGS)
    except OSError as e:
        raise IndexFileError(str(file), f"cannot be read ({e.strerror or e})") from None
    try:
        return os.read(fd, n)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _fsync_directory(directory: Path) -> None:
    """Make a file's creation, rename or removal in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(file: Path) -> None:
    try:
        os.unlink(file)
    except FileNotFoundError:
        pass


# --- schema, meta and rows ----------------------------------------------------------------------------------


def _create_or_check_schema(db: sqlite3.Connection, file: Path) -> None:
    """A new (or crashed-while-new, table-less) database gets our schema; a format 1 one is migrated (the
    writer holds the lock: no other writer migrates it at once; readers see it before or after); any other
    must have exactly our schema. Also the writer's settings: WAL (persistent in the file; set again in case a
    copy lost it), so that readers never block the writer nor see its uncommitted rows, and SYNCHRONOUS (per
    connection)."""
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
    if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        if any(_VECTORS_NAME.fullmatch(name) for name in os.listdir(file.parent)):
            raise IndexFileError(str(file), "an empty database next to stored vectors, not an index")
        db.execute("BEGIN IMMEDIATE")
        for statement in _FORMATS[FORMAT]:
            db.execute(statement)
        now = repr(time.time())
        initial = {"format": FORMAT, "num_query": "", "dim": "", "model": "", "fingerprint": ""}
        initial |= {"created": now, "updated": now, "slots": "0", "vectors": FIRST_VECTORS}
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", initial.items())
        db.execute("COMMIT")
    if _check_schema(db, file) != OLD_FORMAT:
        return
    if db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() == (OLD_FORMAT,):
        db.execute("BEGIN IMMEDIATE")
        for statement in _MIGRATION_V2:
            db.execute(statement)
        _write_meta(db, {"format": FORMAT})
        db.execute("COMMIT")


def _check_schema(db: sqlite3.Connection, file: Path) -> str:
    """The format whose tables and indexes the database has exactly (a crafted trigger or view would run on
    our reads and writes)."""
    found = db.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    for name in _FORMATS:
        if sorted(found) == _schema_of(name):
            return name
    raise IndexFileError(str(file), "not a blip2 index database (unexpected tables or schema)")


@functools.cache
def _schema_of(format: str) -> list[tuple[str, str, str]]:
    """The (type, name, sql) rows of sqlite_master that format's statements make (`ALTER TABLE` rewrites a
    table's text: SQLite itself says what it becomes), sorted."""
    db = sqlite3.connect(":memory:")
    try:
        for statement in _FORMATS[format]:
            db.execute(statement)
        return sorted(
            db.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
        )
    finally:
        db.close()


def _read_meta(db: sqlite3.Connection, file: Path) -> dict[str, Any]:
    """The meta table, parsed and bounded (SQLite's own errors are left to `Store._guard`)."""
    if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        raise IndexFileError(str(file), "an empty database, not an index")
    schema = _check_schema(db, file)
    raw = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if raw.get("format") != schema:
        raise IndexFileError(str(file), f"format {str(raw.get('format'))[:80]!r}, expected {schema!r}")
    meta: dict[str, Any] = {"format": schema}
    for key, parse in _META_VALUES.items():
        if key not in raw:
            raise IndexFileError(str(file), f"meta has no {key!r}")
        try:
            meta[key] = parse(raw[key])
        except (TypeError, ValueError) as e:
            raise IndexFileError(str(file), f"meta {key} = {str(raw[key])[:80]!r}: {e}") from None
    if (meta["num_query"] is None) != (meta["dim"] is None):
        raise IndexFileError(str(file), "meta has num_query or dim without the other")
    if meta["num_query"] is not None:
        try:
            _check_shape(meta["num_query"], meta["dim"])
        except InputError as e:
            raise IndexFileError(str(file), f"meta: {e}") from None
    return meta


def _delete_paths(db: sqlite3.Connection, paths: Sequence[str]) -> int:
    """Delete the rows at `paths`, their slots recorded as dead; returns how many rows there were."""
    params = [(p,) for p in paths]
    db.executemany("INSERT INTO dead(slot) SELECT slot FROM images WHERE path = ?", params)
    before = db.total_changes
    db.executemany("DELETE FROM images WHERE path = ?", params)
    return db.total_changes - before


def _write_meta(db: sqlite3.Connection, values: dict[str, str]) -> None:
    db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())


def _text(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


def _optional_int(value: str) -> int | None:
    return None if _text(value) == "" else int(value)


def _count(value: str) -> int:
    number = int(_text(value))
    if number < 0:
        raise ValueError("negative")
    return number


def _finite(value: str) -> float:
    number = float(_text(value))
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _vectors_name(value: str) -> str:
    if not _VECTORS_NAME.fullmatch(_text(value)):
        raise ValueError("not a vector file name of this index (vectors.f16 or vectors.N.f16)")
    return value


_META_VALUES = {
    "num_query": _optional_int,
    "dim": _optional_int,
    "model": _text,
    "fingerprint": _text,
    "created": _finite,
    "updated": _finite,
    "slots": _count,
    "vectors": _vectors_name,
}


def _check_shape(num_query: int, dim: int) -> None:
    if not (isinstance(num_query, int) and isinstance(dim, int)):
        raise InputError(f"embedding size must be integers, got {num_query!r}x{dim!r}")
    if not (1 <= num_query <= MAX_NUM_QUERY and 1 <= dim <= MAX_DIM):
        raise InputError(f"embedding size {num_query}x{dim} outside 1..{MAX_NUM_QUERY} x 1..{MAX_DIM}")


def _check_new_rows(rows: Sequence[NewRow]) -> None:
    paths = set()
    for row in rows:
        if not isinstance(row.path, str) or not row.path or "\x00" in row.path:
            raise InputError(f"{row.path!r}: an index path must be a non-empty string without NUL")
        if (row.source is None) != (row.key is None) or (row.source is None and row.locator is not None):
            raise InputError(f"{row.path!r}: a source, its key and locator go together")
        if len(row.locator or "") > MAX_LOCATOR_CHARS:
            raise InputError(f"{row.path!r}: a locator of more than {MAX_LOCATOR_CHARS} characters")
        for text in (
            row.path,
            row.hash,
            row.caption or "",
            row.source or "",
            row.key or "",
            row.locator or "",
        ):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{row.path!r}: {text[:200]!r} is not UTF-8 text") from None
        if row.path in paths:
            raise InputError(f"{row.path}: given twice in one batch")
        paths.add(row.path)


# The Python types of a row's columns as SQLite returns them (STRICT tables; caption, source, key and
# locator may be NULL).
_TEXT_OR_NULL = (str, type(None))
_ROW_TYPES = {
    (str, str, int, float, int, int, caption, source, key, locator, int, float)
    for caption in _TEXT_OR_NULL
    for source in _TEXT_OR_NULL
    for key in _TEXT_OR_NULL
    for locator in _TEXT_OR_NULL
}


def _rows(found: list[tuple[Any, ...]], file: Path) -> list[Row]:
    """Database rows as `Row`s, their types checked (a crafted file may hold anything)."""
    rows = []
    for values in found:
        if tuple(map(type, values)) not in _ROW_TYPES:
            raise IndexFileError(str(file), f"a malformed row ({str(values)[:200]})")
        if "\x00" in values[0]:
            raise IndexFileError(str(file), f"a path with a NUL character ({values[0][:200]!r})")
        *new, slot, added = values
        if (new[7] is None) != (new[8] is None):
            raise IndexFileError(
                str(file), f"a row with a source but no key, or a key but no source ({new[0][:200]!r})"
            )
        rows.append(Row(*new, slot=slot, added=added))
    return rows


def _where_sql(where: Where | None) -> tuple[str, list[str]]:
    """A WHERE clause built only from constant text; the filter's values go in as parameters. SQLite's own
    tests run first (a NULL caption, a relaxed GLOB), so the exact Python test sees only the rows they pass."""
    clauses, params = [], []
    if where is not None and where.caption is not None:
        clauses.append("caption IS NOT NULL AND b2_contains(caption, ?)")
        params.append(where.caption)
    if where is not None and where.path is not None:
        clauses.append("path GLOB ? AND b2_glob(path, ?)")
        params += [_relaxed_glob(where.path), where.path]
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _relaxed_glob(pattern: str) -> str:
    """An SQLite GLOB pattern that matches at least what the fnmatch `pattern` matches: `*` and `?` mean the
    same in both, a `[...]` set becomes `?` (any one character), and a `[` that opens no set is literal."""
    out, i = [], 0
    while i < len(pattern):
        c, i = pattern[i], i + 1
        if c != "[":
            out.append(c)
            continue
        end = i + (pattern[i : i + 1] == "!")  # fnmatch's scan for the set's closing bracket
        end += pattern[end : end + 1] == "]"
        end = pattern.find("]", end)
        if end < 0:
            out.append("[[]")
        else:
            out.append("?")
            i = end + 1
    return "".join(out)


def _contains(text: str | None, needle: str) -> bool:
    return isinstance(text, str) and needle.casefold() in text.casefold()


def _glob(path: str, pattern: str) -> bool:
    return isinstance(path, str) and fnmatch.fnmatchcase(path, pattern)
