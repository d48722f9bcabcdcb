"""The index store's add throughput (rows/s) from in-memory vectors, and its disk use per image.

    python benchmarks/index_store_speed.py --rows 16384 --batches 256 4096 --synchronous FULL NORMAL

Each run adds `--rows` rows of Q x D random unit fp16 vectors (32 x 256 by default, the released checkpoints)
to a fresh index in `--dir` (on the disk the index would live on: the vectors are fsynced per batch), with
realistic row values (a 60-character path, a sha256 hex hash). Best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from blip2.index import store as store_module
from blip2.index.store import NewRow, open_store


def _rows(n: int, batch: int) -> list[NewRow]:
    return [
        NewRow(
            f"/home/someone/Pictures/2025/holidays/batch{batch}/IMG_{i:08d}.jpg",
            f"{i:064x}",
            2_345_678,
            1.7e9,
            4032,
            3024,
        )
        for i in range(n)
    ]


def run(rows: int, batch: int, synchronous: str, q: int, d: int, directory: Path) -> tuple[float, float]:
    """(rows/s, bytes on disk per row) for one fresh index."""
    store_module.SYNCHRONOUS = synchronous
    vectors = np.random.default_rng(0).standard_normal((batch, q, d)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float16)
    new = _rows(rows, batch)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        with open_store(Path(tmp) / "bench.idx", writable=True) as store:
            store.bind(q, d, "bench", "")
            start = time.perf_counter()
            for first in range(0, rows, batch):
                store.add(new[first : first + batch], vectors[: len(new[first : first + batch])])
            seconds = time.perf_counter() - start
        with open_store(
            Path(tmp) / "bench.idx"
        ) as store:  # closed: the WAL is checkpointed into index.sqlite
            per_row = store.disk_bytes() / rows
    return rows / seconds, per_row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 4096])
    parser.add_argument(
        "--synchronous", nargs="+", default=["FULL", "NORMAL"], choices=["FULL", "NORMAL", "OFF"]
    )
    parser.add_argument("--num-query", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    print(
        f"{args.rows} rows of {args.num_query}x{args.dim} fp16 in {args.dir}; load {os.getloadavg()[0]:.2f}"
    )
    print(f"| synchronous | batch | rows/s (best of {args.repeats}) | disk per image |")
    print("|---|---|---|---|")
    for synchronous in args.synchronous:
        for batch in args.batches:
            runs = [
                run(args.rows, batch, synchronous, args.num_query, args.dim, args.dir)
                for _ in range(args.repeats)
            ]
            speed = max(r[0] for r in runs)
            print(f"| {synchronous} | {batch} | {speed:,.0f} | {runs[0][1] / 1024:.2f} KiB |")


if __name__ == "__main__":
    main()
