"""A writer process for the store's crash and concurrency tests (run by tests/index/test_store.py).

    python store_writer.py INDEX FIRST COUNT BATCH [--pause-at K] [--timeout S]

adds the rows `p{FIRST}` .. `p{FIRST+COUNT-1}` in batches of BATCH, skipping paths already stored (as a
resumed `index add` does), each with the vectors `expected_vectors(path)`, printing a line per committed
batch. With --pause-at K it stops before
committing its K-th batch (0-based) — after that batch's vectors are written and fsynced — writes
INDEX.paused and sleeps until killed. Exit status 3: the index was busy.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from blip2.errors import IndexBusyError
from blip2.index import store as store_module
from blip2.index.store import NewRow, open_store

Q, D = 4, 8


def expected_vectors(path: str) -> np.ndarray:
    """The unit vectors (Q, D) float16 that belong to `path`: a function of the path alone."""
    v = np.random.default_rng(zlib.crc32(path.encode())).standard_normal((Q, D))
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float16)


def new_row(path: str) -> NewRow:
    return NewRow(path, f"hash-{path}", size=len(path), mtime=1.0, width=1, height=1)


def _pause_before_commit(index: Path, batch: int) -> None:
    """Make the `batch`-th commit of this process stop for good, its vectors already durable."""
    insert = store_module.Store._insert_rows
    calls = [0]

    def paused(self, rows, slots):
        if calls[0] == batch:
            (index.parent / f"{index.name}.paused").write_text(str(slots[0]))
            while True:
                time.sleep(1)
        calls[0] += 1
        return insert(self, rows, slots)

    store_module.Store._insert_rows = paused  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("index", type=Path)
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--timeout", type=float, default=0.0)
    args = parser.parse_args()
    if args.pause_at is not None:
        _pause_before_commit(args.index, args.pause_at)
    try:
        store = open_store(args.index, writable=True, lock_timeout=args.timeout)
    except IndexBusyError as e:
        print(e, file=sys.stderr)
        return 3
    with store:
        store.bind(Q, D, "tiny", "")
        paths = [f"p{i}" for i in range(args.first, args.first + args.count)]
        todo = [p for p in paths if store.get(p) is None]
        for start in range(0, len(todo), args.batch):
            batch = todo[start : start + args.batch]
            slots = store.add([new_row(p) for p in batch], np.stack([expected_vectors(p) for p in batch]))
            print(slots[-1], flush=True)  # one line per committed batch: the parent kills after some of them
    return 0


if __name__ == "__main__":
    sys.exit(main())
