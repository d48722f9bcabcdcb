"""Where a job's rows go, committed a chunk at a time so that a kill at any moment loses at most the chunk
being written and never leaves a duplicate or a torn file.

Parquet: `OUT/part-00000.parquet`, ... in a folder (readable as one table by pyarrow.dataset, pandas,
DuckDB, Spark); each part is written under a hidden temporary name, fsynced, renamed into place and the
folder fsynced: a part either exists whole or not at all. JSONL: one file, each chunk's lines appended in
one write and fsynced; a last line torn by a kill is cut off when the job is resumed.

Beside the rows, a manifest (`OUT/_job.json` for parquet, `OUT.job.json` for JSONL, replaced atomically)
holds the job's identity: task, model, options and the input columns kept (`extra`), with a format version
(2: rows keyed by source, key and sha256; an output of version 1, whose rows have no key, is refused with a
hint to --overwrite). Readers of the parquet folder skip names starting with '_' or '.', so the manifest and
temporary files are not read as data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import Blip2Error

MANIFEST_VERSION = 2  # 1: rows without a `key` column (before tar shards and tables)
_PART = "part-{:05d}.parquet"
MAX_LINE = 1 << 24  # a JSONL row longer than this (16 MiB) is not one of ours


class JobError(Blip2Error):
    """A job's output cannot be used: written by another job (model or options), not a job's output, or
    damaged. The message names the file."""


def open_output(out: str, identity: dict[str, Any], columns: dict[str, str], overwrite: bool) -> Output:
    """The output `out` (a folder for `.parquet`, a file for `.jsonl`), checked against the job's
    `identity`: a new one is created; an existing one of the same job is reopened to be continued; one of
    another job is a JobError unless `overwrite`, which deletes it first."""
    kind = _kind(out)
    output: Output = ParquetOutput(out, columns) if kind == "parquet" else JsonlOutput(out)
    found = output.manifest.exists() or os.path.lexists(out)
    if found and overwrite:
        output.remove()
    elif found:
        _check_identity(output, identity)
    output.create(identity)
    return output


def _kind(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise JobError(f"{out}: the output must end in .parquet (a folder of parquet parts) or .jsonl")
    return suffix[1:]


def _check_identity(output: Output, identity: dict[str, Any]) -> None:
    if not output.manifest.exists():
        raise JobError(
            f"{output.path}: exists and is not the output of a blip2 job (--overwrite replaces it)"
        )
    try:
        found = json.loads(output.manifest.read_bytes()[: 1 << 20])
    except (OSError, ValueError) as e:
        raise JobError(f"{output.manifest}: unreadable job manifest ({e})") from None
    if isinstance(found, dict) and found.get("version") == 1:
        raise JobError(
            f"{output.path}: written by an earlier blip2, whose rows have no `key` column; "
            "--overwrite starts it again in the current format"
        )
    if not isinstance(found, dict) or found.get("version") != MANIFEST_VERSION:
        raise JobError(f"{output.manifest}: not a blip2 job manifest of version {MANIFEST_VERSION}")
    changed = [key for key in identity if found.get(key) != identity[key]]
    if changed:
        detail = "; ".join(f"{key}: {found.get(key)!r} then, {identity[key]!r} now" for key in changed)
        raise JobError(
            f"{output.path} was written by another job ({detail}); use the same command to resume it, "
            "or --overwrite to start again"
        )


class Output:
    """A job's rows on disk; see the module docstring."""

    path: Path
    manifest: Path

    def create(self, identity: dict[str, Any]) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def keys(self) -> Iterator[tuple[str, str, str | None]]:
        """(source, key, sha256) of each committed row, in the order written: the inputs done."""
        raise NotImplementedError

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Commit `rows` as one chunk: on return they are on disk; a kill before leaves no trace of them."""
        raise NotImplementedError


class ParquetOutput(Output):
    def __init__(self, out: str, columns: dict[str, str]) -> None:
        self.path = Path(out)
        self.manifest = self.path / "_job.json"
        self.columns = columns

    def create(self, identity: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp"):  # parts a kill left unfinished
            stale.unlink()
        write_atomic(self.manifest, json.dumps({"version": MANIFEST_VERSION, **identity}, indent=1).encode())

    def remove(self) -> None:
        """Delete a job's folder for --overwrite: only the files a job writes (the manifest, parts, unfinished
        parts), and the folder itself; a folder holding anything else is refused, not emptied."""
        if not self.path.is_dir() or self.path.is_symlink():
            self.path.unlink()
            return
        ours = [p for p in self.path.iterdir() if self._is_ours(p)]
        others = sorted(p.name for p in self.path.iterdir() if not self._is_ours(p))
        if others:
            raise JobError(
                f"{self.path}: --overwrite deletes only a job's own files, and this folder holds others "
                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); choose another --out"
            )
        for path in ours:
            path.unlink()
        self.path.rmdir()

    def _is_ours(self, path: Path) -> bool:
        name = path.name
        plain = path.is_file() and not path.is_symlink()
        job_file = name == "_job.json" or (name.startswith("part-") and name.endswith(".parquet"))
        return plain and (job_file or (name.startswith(".") and name.endswith(".tmp")))

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def keys(self) -> Iterator[tuple[str, str, str | None]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for part in self._parts():
            try:
                table = pq.read_table(part, columns=["source", "key", "sha256"])
            except (OSError, ValueError, KeyError, pa.ArrowException) as e:
                raise JobError(f"{part}: unreadable part of the job ({e})") from None
            for number, row in enumerate(table.to_pylist()):
                yield _key(row, f"{part}, row {number}")

    def append(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self._parts()
        number = int(parts[-1].name[5:10]) + 1 if parts else 0
        final = self.path / _PART.format(number)
        table = pa.Table.from_pylist(rows, schema=_schema(self.columns))
        temporary = self.path / f".{final.name}.tmp"
        with open(temporary, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
        _fsync_folder(self.path)


def _schema(columns: dict[str, str]):
    """The rows' typed schema: the job's own columns around the task's result columns (pyarrow type names)."""
    import pyarrow as pa

    fields = [("source", pa.string()), ("index", pa.int64()), ("key", pa.string()), ("sha256", pa.string())]
    fields += [(name, _arrow_type(kind)) for name, kind in columns.items()]
    fields += [("model", pa.string()), ("options", pa.string()), ("error", pa.string())]
    return pa.schema(fields)


def _arrow_type(kind: str):
    """A result column's pyarrow type: a pyarrow alias ("string"), "list<T>" for a list ("list<list<float>>":
    an embedding, one list of floats per query token), or "list<a:T,b:U>" for a list of records (e.g.
    "list<question:string,answer:string>"; a field a record lacks is null)."""
    import pyarrow as pa

    if not (kind.startswith("list<") and kind.endswith(">")):
        return pa.type_for_alias(kind)
    if ":" not in kind:
        return pa.list_(_arrow_type(kind[5:-1]))
    fields = [field.split(":") for field in kind[5:-1].split(",")]
    return pa.list_(pa.struct([(name, pa.type_for_alias(alias)) for name, alias in fields]))


class JsonlOutput(Output):
    def __init__(self, out: str) -> None:
        self.path = Path(out)
        self.manifest = Path(out + ".job.json")

    def create(self, identity: dict[str, Any]) -> None:
        write_atomic(self.manifest, json.dumps({"version": MANIFEST_VERSION, **identity}, indent=1).encode())
        self.path.touch()
        self._cut_torn_line()

    def remove(self) -> None:
        for path in (self.path, self.manifest):
            if os.path.lexists(path):
                path.unlink()

    def _cut_torn_line(self) -> None:
        """A kill in the middle of an append can leave a last line without its newline: cut it off (its
        rows were not committed and are written again)."""
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                f.seek(max(0, end - 65536))
                block = f.read(end - max(0, end - 65536))
                newline = block.rfind(b"\n")
                if newline >= 0:
                    end = max(0, end - len(block)) + newline + 1
                    break
                end -= len(block)
            if end != size:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def keys(self) -> Iterator[tuple[str, str, str | None]]:
        with open(self.path, "rb") as f:
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
                try:
                    row = json.loads(line) if len(line) <= MAX_LINE else None
                except ValueError:
                    row = None
                yield _key(row, f"{self.path}:{number}")

    def append(self, rows: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _key(row: object, where: str) -> tuple[str, str, str | None]:
    """A committed row's (source, key, sha256), checked: the output may have been edited or crafted."""
    if not isinstance(row, dict):
        raise JobError(f"{where}: not a row of a blip2 job")
    source, key, digest = row.get("source"), row.get("key"), row.get("sha256")
    if (
        not isinstance(source, str)
        or not isinstance(key, str)
        or not (digest is None or isinstance(digest, str))
    ):
        raise JobError(f"{where}: not a row of a blip2 job (source, key and sha256 must be text)")
    return source, key, digest


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by a file holding `data`: readers see the old file or the new one, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
