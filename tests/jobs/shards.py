"""Test inputs beyond folders: WebDataset tar shards and tables, built from the test photos."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def add_member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_shard(path: Path, photos: list[Path], start: int = 0) -> list[str]:
    """A shard of one sample per photo (`{start+i:06d}.jpg`, `.txt`, `.json`); returns the keys."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, photo in enumerate(photos, start):
            key = f"{i:06d}"
            add_member(tar, f"{key}.jpg", photo.read_bytes())
            add_member(tar, f"{key}.txt", f"caption {i}".encode())
            add_member(tar, f"{key}.json", json.dumps({"n": i, "url": f"http://x/{i}"}).encode())
            keys.append(key)
    return keys


def write_table(path: Path, rows: list[dict], schema=None) -> None:
    """A parquet (or CSV, by the suffix) table of `rows`."""
    if path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
