"""Embedding files: (N, ...) float32 rows, each with the image path it belongs to, written row by row and
read back with `read_embeddings(path) -> (paths, array)`.

Formats (the extension, in any case, chooses):

- `.npy`: the array, and `FILE.paths.jsonl` beside it: one JSON object per row, in row order.
- `.parquet`: columns `image` (string), `image_bytes` (binary, see below) and `embedding` (a fixed-size list
  of float32, the row flattened row-major), with the row shape in the schema metadata (`shape`, e.g. "32,256").

File names are stored losslessly. `image` is the name as valid UTF-8 text: the name itself when it is valid
UTF-8, else with each undecodable byte written as `\\xNN`. Only then `image_bytes` holds the name's raw bytes
(base64 in JSON), from which `read_embeddings` gives back exactly the `str` Python made of the name
(`os.fsdecode`). Tabs, newlines and any other characters are kept as they are.

`read_embeddings` also reads the output of `blip2 embed --out FILE.parquet|FILE.jsonl`, a job (see
`blip2.jobs`): the rows with an `image_embeds_proj` (a list of Q lists of D floats), in input order.

Writing never leaves a half-written or mismatched pair: rows go to temporary files in the destination folder
as they are produced, and `close()` moves complete files into place with `os.replace`, the sidecar before
the array, after removing the old array (so an old array never sits beside a new sidecar).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import math
import os
import secrets
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from .errors import Blip2Error, InputError

FORMATS = (".npy", ".parquet")
SIDECAR = ".paths.jsonl"
# The plain-text sidecar that blip2 wrote before FILE.paths.jsonl: removed when FILE is rewritten.
OLD_SIDECAR = ".paths.txt"
PARQUET_ROW_GROUP = 256  # rows buffered per parquet row group (32 KB each for (32, 256) embeddings)


# -- names --------------------------------------------------------------------------------------------------
def valid_text(text: str) -> str:
    """`text` as valid UTF-8: the undecodable bytes of a file name (lone surrogates, as os.fsdecode leaves
    them) written as `\\xNN`. Text without them is returned unchanged."""
    return _raw(text).decode("utf-8", "backslashreplace")


def path_fields(path: str) -> dict[str, str]:
    """How a file name is written in JSON: {"image": valid_text(path)}, plus "image_bytes" (the name's raw
    bytes, base64) when the name is not valid UTF-8, so that `path_from_fields` gives back exactly `path`."""
    fields = {"image": valid_text(path)}
    if fields["image"] != path:
        fields["image_bytes"] = base64.b64encode(_raw(path)).decode("ascii")
    return fields


def path_from_fields(fields: Any, where: str) -> str:
    """The file name a `path_fields` record stands for; InputError naming `where` when it is malformed."""
    if not isinstance(fields, dict) or not isinstance(fields.get("image"), str):
        raise InputError(f"{where}: expected an object with an 'image' string")
    encoded = fields.get("image_bytes")
    if encoded is None:
        return fields["image"]
    try:
        return os.fsdecode(base64.b64decode(encoded, validate=True))
    except (TypeError, binascii.Error) as e:
        raise InputError(f"{where}: 'image_bytes' is not base64 ({e})") from None


def _raw(text: str) -> bytes:
    """The bytes a name stands for: os.fsencode's, or for a lone surrogate that is no escaped byte (not
    from the file system) its UTF-8 form, so that writing never fails."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


# -- writing ------------------------------------------------------------------------------------------------
def sidecar_path(path: Path) -> Path:
    """Where the paths of a .npy file live: FILE.paths.jsonl beside it."""
    return path.with_name(path.name + SIDECAR)


def check_output_path(out: str | Path) -> Path:
    """Refuse an unsupported extension, a directory or a missing folder before any work is done (whether the
    folder is writable is checked by `open_writer`, which creates its temporary files there)."""
    path = Path(out)
    shown = valid_text(str(out))
    for target in (path, sidecar_path(path)):
        if target.is_dir():
            raise InputError(f"--out {shown}: {valid_text(str(target))} is a directory")
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"--out {shown}: use a .npy or .parquet file name")
    if not path.parent.is_dir():
        raise InputError(f"--out {shown}: the folder {valid_text(str(path.parent))} does not exist")
    if path.suffix.lower() == ".parquet":
        _pyarrow()
    return path


P = ParamSpec("P")
R = TypeVar("R")


def _uninterrupted(method: Callable[P, R]) -> Callable[P, R]:
    """Hold Ctrl-C (SIGINT) while `method` runs, so that a row or a file is never half written: the interrupt
    is raised as usual as soon as it returns. (Signals only reach the main thread; elsewhere it just runs.)"""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if threading.current_thread() is not threading.main_thread():
            return method(*args, **kwargs)
        held: list[tuple[Any, ...]] = []
        previous = signal.signal(signal.SIGINT, lambda *received: held.append(received))
        try:
            return method(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)
            if held and callable(previous):
                previous(*held[0])  # Python's default handler raises KeyboardInterrupt

    return wrapper


def open_writer(out: str | Path) -> EmbeddingsWriter:
    """A writer for `out` (.npy or .parquet), its temporary files already created beside it: an unusable
    destination fails here, before any work."""
    path = check_output_path(out)
    return NpyWriter(path) if path.suffix.lower() == ".npy" else ParquetWriter(path)


class EmbeddingsWriter:
    """Rows appended one at a time to temporary files beside the destination; `close()` moves what was
    written into place (also after an interrupted run: the rows appended are the rows in the file)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self._temps: list[Path] = []
        self._failed = False
        self._data = self._temp_file()

    @_uninterrupted
    def append(self, path: str, vector: np.ndarray) -> int:
        """Add one row (float32, the same shape for every row) for image `path`; returns its row index."""
        vector = np.asarray(vector, dtype=np.float32)
        if self.row_shape is not None and vector.shape != self.row_shape:
            raise InputError(
                f"{valid_text(str(self.path))}: a row of shape {vector.shape} after rows of shape {self.row_shape}"
            )
        with self._writing():
            if self.row_shape is None:
                self.row_shape = vector.shape
                self._start()
            self._write(path, vector)
        self.rows += 1
        return self.rows - 1

    @_uninterrupted
    def close(self) -> tuple[int, ...] | None:
        """Finish: move the complete files into place and return the array's shape. With no rows, nothing is
        written and an earlier run's file at the destination is removed (it would pass for this run's)."""
        if self._failed:
            return None
        with self._writing():
            if not self.rows:
                self.discard()
                self._remove_outputs()
                return None
            self._finish()
            for temp in self._temps:
                _sync(temp)
            self._remove_outputs()
            self._commit()
        return (self.rows, *self._row_shape)

    @property
    def _row_shape(self) -> tuple[int, ...]:
        """The shape of every row, known from the first row on: the format steps all run after it."""
        assert self.row_shape is not None
        return self.row_shape

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (a full disk, a folder gone) drops the temporary files and is one clear error;
        the writer then writes nothing more."""
        try:
            yield
        except OSError as e:
            self._failed = True
            self.discard()
            raise Blip2Error(f"{valid_text(str(self.path))}: cannot write: {e.strerror or e}") from None

    def discard(self) -> None:
        """Remove the temporary files, leaving the destination as it was."""
        for file in self._open_files():
            with contextlib.suppress(OSError):  # closing flushes; the data is being thrown away anyway
                file.close()
        for temp in self._temps:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)

    def _open_files(self) -> list:
        return [self._data]

    def _temp_file(self):
        """A new temporary file in the destination folder, where os.replace can move it into place."""
        # Not tempfile.mkstemp: its files are private (0600), and the result should get the usual
        # permissions (0666 less the umask), like any file the user writes.
        name = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.part")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            folder = valid_text(str(self.path.parent))
            raise InputError(
                f"--out {valid_text(str(self.path))}: cannot write in {folder}: {e.strerror}"
            ) from e
        self._temps.append(name)
        return os.fdopen(fd, "wb")

    def _remove_outputs(self) -> None:
        self.path.unlink(missing_ok=True)

    # Format-specific steps (and _open_files above).
    def _start(self) -> None:
        """Called at the first row, when the row shape is known."""

    def _write(self, path: str, vector: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Complete the temporary files (headers, footers) and close them."""

    def _commit(self) -> None:
        os.replace(self._temps[0], self.path)


class NpyWriter(EmbeddingsWriter):
    """.npy: the raw float32 rows follow a header sized for any row count (numpy pads the header so that the
    first dimension can grow), rewritten with the final count at the end; the paths go to the sidecar."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._paths = self._temp_file()

    def _start(self) -> None:
        self._header_size = self._write_header(0)

    def _write(self, path: str, vector: np.ndarray) -> None:
        self._data.write(vector.astype("<f4").tobytes())
        self._paths.write(json.dumps(path_fields(path), ensure_ascii=False).encode("utf-8") + b"\n")

    def _finish(self) -> None:
        self._data.seek(0)
        assert self._write_header(self.rows) == self._header_size  # numpy pads the header for this
        self._data.close()
        self._paths.close()

    def _write_header(self, rows: int) -> int:
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, *self._row_shape)}
        np.lib.format.write_array_header_1_0(self._data, header)
        return self._data.tell()

    def _open_files(self) -> list:
        return [self._data, self._paths]

    def _remove_outputs(self) -> None:
        super()._remove_outputs()  # the array first: an old array never sits beside a new sidecar
        for sidecar in (sidecar_path(self.path), self.path.with_name(self.path.name + OLD_SIDECAR)):
            sidecar.unlink(missing_ok=True)

    def _commit(self) -> None:
        os.replace(self._temps[1], sidecar_path(self.path))
        super()._commit()


class ParquetWriter(EmbeddingsWriter):
    """.parquet: one container file, written a row group at a time."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._pending: list[tuple[str, np.ndarray]] = []
        self._parquet: Any = None  # a pyarrow ParquetWriter from the first row (pyarrow is untyped)

    def _start(self) -> None:
        pa, pq = _pyarrow()
        schema = pa.schema(
            [
                ("image", pa.string()),
                ("image_bytes", pa.binary()),
                ("embedding", pa.list_(pa.float32(), math.prod(self._row_shape))),
            ],
            metadata={"shape": ",".join(map(str, self._row_shape))},
        )
        self._data.close()  # pyarrow writes the file itself
        self._parquet = pq.ParquetWriter(str(self._temps[0]), schema)

    def _write(self, path: str, vector: np.ndarray) -> None:
        self._pending.append((path, vector))
        if len(self._pending) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pa, _ = _pyarrow()
        names = [path_fields(p) for p, _ in self._pending]
        flat = np.stack([v.ravel() for _, v in self._pending])
        table = pa.Table.from_arrays(
            [
                pa.array([n["image"] for n in names], pa.string()),
                pa.array(
                    [_raw(p) if "image_bytes" in n else None for (p, _), n in zip(self._pending, names)],
                    pa.binary(),
                ),
                pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
            ],
            schema=self._parquet.schema,
        )
        self._parquet.write_table(table)
        self._pending = []

    def _finish(self) -> None:
        self._flush()
        self._parquet.close()

    def _open_files(self) -> list:
        return [self._data] if self._parquet is None else [self._parquet, self._data]


def _sync(path: Path) -> None:
    """Make a file's data durable before it is moved into place (else a crash could leave it empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingRows:
    """Embeddings read back: `names[i]` names row i of `array`; from a job's output, also each row's `sources`
    and `keys` (equal for an image file) and `hashes` (the sha256 of the image's bytes), else None."""

    names: list[str]
    array: np.ndarray
    sources: list[str] | None = None
    keys: list[str] | None = None
    hashes: list[str] | None = None


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read back what the writer wrote: (paths, float32 array), row i belonging to paths[i]. A file that is
    not such a pair (hostile or damaged: bad header or metadata, fewer names than rows) is an InputError
    naming the file."""
    rows = read_embedding_rows(path)
    return rows.names, rows.array


def read_embedding_rows(path: str | Path) -> EmbeddingRows:
    """`read_embeddings`, with the sources, keys and hashes of a job's rows (see `EmbeddingRows`)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".jsonl":
        return _read_job(path)
    if path.suffix.lower() == ".npy":
        array = _read_npy(path)
        return EmbeddingRows(_read_sidecar(sidecar_path(path), len(array)), array)
    if path.suffix.lower() == ".parquet":
        return EmbeddingRows(*_read_parquet(path))
    raise InputError(f"{valid_text(str(path))}: not a .npy or .parquet embeddings file")


def _read_job(path: Path) -> EmbeddingRows:
    """The rows of a `blip2 embed --out` job (a .parquet folder of parts, or .jsonl) that have an embedding,
    in input order, (N, Q, D) float32. An image file is named by its path, an image inside a tar shard or a
    table by `SOURCE#KEY`."""
    where = valid_text(str(path))
    read = _job_rows_jsonl if path.suffix.lower() == ".jsonl" else _job_rows_parquet
    sources, keys, hashes, array = read(path, where)
    if not len(array):
        raise InputError(f"{where}: no embeddings in this job's output")
    if not all(isinstance(name, str) for name in [*sources, *keys, *hashes]):
        raise InputError(f"{where}: some rows have no source, key or sha256")
    names = [source if key == source else f"{source}#{key}" for source, key in zip(sources, keys)]
    return EmbeddingRows(names, array, sources, keys, hashes)


def _job_rows_parquet(path: Path, where: str) -> tuple[list, list, list, np.ndarray]:
    """(sources, keys, sha256s, (N, Q, D) embeddings) of the parts' rows without an error, by index; vectorised: a
    job of a million images is read without a Python float per value."""
    pa, _ = _pyarrow()
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    try:  # parts only: the manifest and unfinished parts start with '_' or '.', which the dataset skips
        table = ds.dataset(path, format="parquet").to_table(
            columns=["source", "key", "sha256", "index", "image_embeds_proj"],
            filter=pc.field("error").is_null(),
        )
        table = table.sort_by("index")
        outer = table.column("image_embeds_proj").combine_chunks()
        inner = outer.flatten()
        queries, size = pc.list_value_length(outer), pc.list_value_length(inner)
        values = np.asarray(inner.flatten(), dtype=np.float32)
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{where}: not the output of a blip2 embed job ({e})") from None
    if outer.null_count or inner.null_count or len(pc.unique(queries)) > 1 or len(pc.unique(size)) > 1:
        raise InputError(f"{where}: embeddings missing or of different shapes")
    shape = (len(table), queries[0].as_py() if len(table) else 0, size[0].as_py() if len(inner) else 0)
    names = [table.column(name).to_pylist() for name in ("source", "key", "sha256")]
    return names[0], names[1], names[2], values.reshape(shape)


def _job_rows_jsonl(path: Path, where: str) -> tuple[list, list, list, np.ndarray]:
    rows = []
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                    if row["error"] is None:
                        rows.append(
                            (
                                int(row["index"]),
                                row["source"],
                                row["key"],
                                row["sha256"],
                                row["image_embeds_proj"],
                            )
                        )
                except (ValueError, KeyError, TypeError) as e:
                    raise InputError(f"{where}:{number}: not a row of a blip2 embed job ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: cannot read ({e})") from None
    rows.sort(key=lambda row: row[0])
    try:
        array = np.array([row[4] for row in rows], dtype=np.float32)
    except (ValueError, TypeError) as e:  # ragged or not numbers
        raise InputError(f"{where}: embeddings of different shapes or not numbers ({e})") from None
    if rows and array.ndim != 3:
        raise InputError(f"{where}: expected (N, Q, D) embeddings, found shape {array.shape}")
    return [row[1] for row in rows], [row[2] for row in rows], [row[3] for row in rows], array


def _read_npy(path: Path) -> np.ndarray:
    try:
        # Memory-mapped first: a header that claims more rows than the file holds fails before allocating.
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{valid_text(str(path))}: not a readable .npy file ({e})") from None
    if mapped.dtype != np.float32 or mapped.ndim < 2:
        raise InputError(
            f"{valid_text(str(path))}: expected float32 rows, found dtype {mapped.dtype} and shape {mapped.shape}"
        )
    return np.array(mapped)


def _read_sidecar(sidecar: Path, rows: int) -> list[str]:
    """The paths of a .npy file, one JSON object per line; exactly `rows` of them."""
    where = valid_text(str(sidecar))
    paths = []
    try:
        with sidecar.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if number > rows:
                    raise InputError(f"{where}: more names than the {rows} rows of the array")
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise InputError(f"{where}: line {number} is not JSON ({e})") from None
                paths.append(path_from_fields(record, f"{where}: line {number}"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: cannot read the image names ({e})") from None
    if len(paths) != rows:
        raise InputError(f"{where}: {len(paths)} names for the {rows} rows of the array")
    return paths


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    pa, pq = _pyarrow()
    where = valid_text(str(path))
    try:
        table = pq.read_table(path, columns=["image", "image_bytes", "embedding"])
    except (OSError, pa.ArrowException, ValueError) as e:
        raise InputError(f"{where}: not a readable embeddings .parquet file ({e})") from None
    shape = _parquet_shape(table.schema.metadata or {}, where)
    column = table.column("embedding").type
    if not pa.types.is_fixed_size_list(column) or column.value_type != pa.float32():
        raise InputError(f"{where}: 'embedding' is {column}, not a fixed-size list of float32")
    if column.list_size != math.prod(shape):
        raise InputError(f"{where}: rows of {column.list_size} values do not have the shape {shape}")
    flat = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    if flat.size != len(table) * column.list_size:  # null rows leave values out
        raise InputError(f"{where}: some embeddings are missing")
    names, raw = table.column("image").to_pylist(), table.column("image_bytes").to_pylist()
    if any(not isinstance(n, str) for n in names):
        raise InputError(f"{where}: some rows have no image name")
    paths = [os.fsdecode(b) if b is not None else n for n, b in zip(names, raw)]
    return paths, flat.reshape(len(table), *shape)


def _parquet_shape(metadata: dict, where: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in metadata[b"shape"].decode("ascii").split(","))
    except (KeyError, ValueError) as e:
        raise InputError(f"{where}: the schema metadata has no valid 'shape' ({e})") from None
    if not shape or min(shape) < 1:
        raise InputError(f"{where}: bad row shape {shape} in the schema metadata")
    return shape


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(".parquet files need pyarrow: pip install 'blip2[parquet]' (or use .npy)") from None
    return pa, pq
