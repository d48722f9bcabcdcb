"""A job's inputs: what the user named, expanded into `Item`s (one image each, read again cheaply by
`Item.read`) and `Failed` inputs (the reason one cannot become an item), in a deterministic order.

Kinds of input, chosen by name:

- image files, folders (recursive), globs and `@list.txt` files: `blip2.sources.find_images`, unchanged
  (images by content, hidden files skipped, each file once). The key of a file is its path.
- WebDataset tar shards (`.tar`, named directly, by a glob, or by a brace pattern such as
  `shards/{00000..00099}.tar`): members are grouped into samples by key (the member's path without its
  extensions, as WebDataset does: `a/b.jpg` and `a/b.json` are sample `a/b`); a sample's first image member
  (by extension: jpg, jpeg, png, webp, gif, bmp, tif, tiff) is its image, its `.txt` and `.json` members are
  kept in `extra` (`txt`, `json`; the JSON parsed and written back compactly). Nothing is extracted to disk:
  an item holds the shard's path and the member's offset and size. Members with an absolute name or a `..`
  component, non-regular members (links, devices), members over the image size limit, truncated or corrupt
  members, and samples without an image are `Failed`.
- tables: `.parquet` (needs pyarrow) and `.csv`, one image per row, from a column of paths or (parquet
  only) of image bytes, or a struct with a `bytes` field as Hugging Face datasets write it. The column is
  `column=` or, by default, the first of `IMAGE_COLUMNS` present with a usable type. The key is the row's
  `key` column when the table has one, else the path as written (path columns) or the row number (bytes
  columns). Paths in a table are relative to the table's folder and must stay inside it (after resolving
  links): an absolute path or one leading outside is a failed row, so a crafted table cannot make a job read
  files elsewhere. A bytes row is read again from its row group (the last groups read are cached), so an
  item never holds image bytes. Columns named in `keep=` are kept in `extra` (text; other types as JSON).

Order: the images `find_images` found, then the shards' and tables' items in the order named, then every
`Failed` input; `index` counts through all of them.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import images
from ..errors import ImageError, InputError
from ..sources import find_images

__all__ = ["IMAGE_COLUMNS", "Failed", "Item", "brace_expand", "expand_inputs", "input_name"]

# Table columns tried, in order, when no column is named: paths, bytes, Hugging Face image structs.
IMAGE_COLUMNS = (
    *("image", "image_path", "path", "file", "filename", "file_name", "filepath"),
    *("jpg", "png", "webp", "bytes", "image_bytes"),
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MAX_EXTRA_BYTES = 1 << 20  # a sample's .txt or .json member: captions and metadata, not files
MAX_MEMBERS = 1 << 20  # members read from one shard: a crafted shard of empty members cannot fill memory
MAX_BRACE_NAMES = 1 << 20  # names one brace pattern may expand to
MAX_ROW_GROUP_BYTES = 1 << 30  # a bytes column's row group, held in memory while its rows are read
TABLE_SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True)
class FileAt:
    """An image file: read whole, up to the image size limit (`blip2.images.MAX_FILE_BYTES`)."""

    path: str

    def read(self, name: str) -> bytes:
        try:
            return images.read_file(self.path, images.MAX_FILE_BYTES)
        except images.Unreadable as e:
            raise ImageError(name, str(e)) from None


@dataclass(frozen=True)
class MemberAt:
    """A tar member: `size` bytes at `offset` in the shard `path` (checked against the limit when found)."""

    path: str
    offset: int
    size: int

    def read(self, name: str) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as e:
            raise ImageError(name, f"cannot read the shard: {e.strerror or e}") from None
        if len(data) != self.size:
            raise ImageError(name, f"truncated member ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True)
class CellAt:
    """A bytes cell of a parquet table: row `row` of row group `group` in column `column`."""

    path: str
    column: str
    group: int
    row: int

    def read(self, name: str) -> bytes:
        value = _row_group(self.path, self.column, self.group)[self.row]
        if isinstance(value, dict):  # a Hugging Face image struct {bytes, path}
            value = value.get("bytes")
        if not value:
            raise ImageError(name, "no image bytes in this row")
        if len(value) > images.MAX_FILE_BYTES:
            raise ImageError(name, f"{len(value)} bytes, more than the limit of {images.MAX_FILE_BYTES}")
        return bytes(value)


@dataclass(frozen=True)
class Item:
    """One input of a job, picklable (sent to worker processes and Ray tasks): its place in the input list,
    the file the user named or that was found (`source`: an image, a shard, a table), the image's key
    within it (the path itself for image files), the columns kept with it (`extra`), and where its bytes
    are (`where`: a file, a tar member, a table cell; never an open handle)."""

    index: int
    source: str
    key: str
    extra: dict[str, str | None] = field(default_factory=dict)
    where: FileAt | MemberAt | CellAt | None = None

    @property
    def name(self) -> str:
        """How messages name it (`input_name`)."""
        return input_name(self.source, self.key)

    def read(self) -> bytes:
        """The image's bytes (at most the image size limit); an ImageError naming source and key."""
        where = self.where or FileAt(self.source)
        return where.read(self.name)


def input_name(source: str, key: str) -> str:
    """How messages name an input: the path for image files, `SOURCE: KEY` inside a shard or a table."""
    return source if key == source else f"{source}: {key}"


@dataclass(frozen=True)
class Failed:
    """An input that cannot become an item, and why (one short phrase)."""

    index: int
    source: str
    key: str
    reason: str


def expand_inputs(
    inputs: Sequence[str],
    *,
    column: str | None = None,
    keep: Sequence[str] = (),
    notes: list[str] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[Item | Failed]:
    """The items and failed inputs `inputs` name (see the module docstring), indexed in order. A table
    without the named column (or without any usable one), or without a `keep` column, is an InputError
    raised before anything is yielded for it: check it before loading a model. `notes` receives one line
    per table saying which column was used. A shard or table for which `skip(path)` is true is not opened
    (an index that holds it unchanged)."""
    plain, named = _split(inputs)
    named = [(kind, path) for kind, path in named if skip is None or not skip(path)]
    tables = [_Table.open(path, column, keep) for kind, path in named if kind == "table"]
    for table in tables:
        if notes is not None:
            notes.append(table.note())
    found = find_images(plain)
    counter = iter(range(1 << 62))
    failed: list[tuple[str, str, str]] = [(s.path, s.path, s.reason) for s in found.skipped]
    for path in found.files:
        yield Item(next(counter), path, path)
    opened = iter(tables)
    for kind, path in named:
        entries = _shard(path) if kind == "tar" else next(opened).entries()
        for entry in entries:
            if isinstance(entry, tuple):
                failed.append(entry)
            else:
                yield Item(next(counter), entry.source, entry.key, entry.extra, entry.where)
    for source, key, reason in failed:
        yield Failed(next(counter), source, key, reason)


def _split(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The inputs for `find_images`, and the shards and tables as ("tar" | "table", path), in order."""
    plain, named = [], []
    for given in inputs:
        names = [given] if os.path.lexists(given) else brace_expand(given)
        for name in names:
            kind = _kind(name)
            if kind is None:
                plain.append(name)
            elif os.path.lexists(name) or not glob.has_magic(name):
                named.append((kind, name))  # a missing one fails when opened, naming it
            else:
                matches = sorted(glob.glob(name, recursive=True))
                plain += [] if matches else [name]  # find_images says that nothing matches
                named += [(kind, match) for match in matches]
    return plain, named


def _kind(name: str) -> str | None:
    suffix = Path(name).suffix.lower()
    return "tar" if suffix == ".tar" else "table" if suffix in TABLE_SUFFIXES else None


# -- brace patterns -------------------------------------------------------------------------------------------
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def brace_expand(pattern: str) -> list[str]:
    """Expand `{a,b}` alternatives and `{000..099}` numeric ranges (zero-padded to the width of the
    wider bound when either is), as a shell does; several groups multiply, nested groups expand inside
    out. A pattern with no group is itself. More than MAX_BRACE_NAMES names is an InputError."""
    group = _first_group(pattern)
    if group is None:
        return [pattern]
    start, end = group
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    options = _group_options(body)
    if options is None:  # not a group ("{}", "{a}"): the brace is a literal character
        return [head + "{" + name for name in brace_expand(body + "}" + tail)]
    names = []
    for option in options:
        for rest in brace_expand(option + tail):
            names.append(head + rest)
            if len(names) > MAX_BRACE_NAMES:
                raise InputError(f"{pattern}: expands to more than {MAX_BRACE_NAMES} names")
    return names


def _first_group(pattern: str) -> tuple[int, int] | None:
    """(start, end) of the first balanced `{...}`, or None."""
    depth, start = 0, -1
    for i, char in enumerate(pattern):
        if char == "{":
            start, depth = (i if depth == 0 else start), depth + 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                return start, i
    return None


def _group_options(body: str) -> list[str] | None:
    """The alternatives of a group's body: a numeric range, or the top-level comma-separated parts."""
    numbers = _RANGE.fullmatch(body)
    if numbers:
        first, last = int(numbers[1]), int(numbers[2])
        if abs(last - first) >= MAX_BRACE_NAMES:
            raise InputError(f"{{{body}}}: a range of more than {MAX_BRACE_NAMES} names")
        padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-").startswith("0") for n in numbers.groups())
        width = max(len(numbers[1]), len(numbers[2])) if padded else 0
        step = 1 if last >= first else -1
        return [str(n).zfill(width) for n in range(first, last + step, step)]
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts if len(parts) > 1 else None


# -- tar shards -----------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    """An item before it gets its index."""

    source: str
    key: str
    extra: dict[str, str | None]
    where: FileAt | MemberAt | CellAt


_Failure = tuple[str, str, str]  # (source, key, reason)


@dataclass
class _Sample:
    """A shard's members of one key: its image, its .txt / .json members, the first reason it is refused."""

    image: tarfile.TarInfo | None = None
    extra: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    failure: str | None = None


def _shard(path: str) -> Iterator[_Entry | _Failure]:
    """The samples of the tar shard at `path`, in order of their first member."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            samples, broken = _samples(f, path)
            for key, sample in samples.items():
                yield _entry(path, key, sample, size, f)
    except OSError as e:
        yield (path, path, f"cannot read the shard: {e.strerror or e}")
        return
    if broken:
        yield (path, path, broken)


def _samples(f: io.BufferedReader, path: str) -> tuple[dict[str, _Sample], str | None]:
    """The shard's members grouped by key, and why reading stopped early (None: it did not)."""
    samples: dict[str, _Sample] = {}
    try:
        # The stream is read header by header (tarfile seeks over the data): memory grows with the
        # number of members kept, capped by MAX_MEMBERS, never with their sizes.
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for number, member in enumerate(tar):
                if number >= MAX_MEMBERS:
                    return samples, f"more than {MAX_MEMBERS} members: the rest is not read"
                _add_member(samples, member)
    except (tarfile.TarError, EOFError) as e:
        return samples, f"not a readable tar file or truncated ({e})"
    return samples, None


_MEMBER = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # (key, extensions): WebDataset's split


def _add_member(samples: dict[str, _Sample], member: tarfile.TarInfo) -> None:
    name = member.name
    match = _MEMBER.match(name)
    if match is None:
        return  # no extension (or a hidden name): not part of a sample, as in WebDataset
    key, extension = match[1], match[2].lower()
    sample = samples.setdefault(key, _Sample())
    unsafe = name.startswith("/") or ".." in name.split("/") or "\0" in name
    if unsafe:
        sample.failure = sample.failure or f"unsafe member name {name!r} (absolute or with '..')"
    elif extension in IMAGE_EXTENSIONS and sample.image is None:
        sample.image = member
    elif extension in ("txt", "json"):
        sample.extra.setdefault(extension, member)


def _entry(path: str, key: str, sample: _Sample, size: int, f: io.BufferedReader) -> _Entry | _Failure:
    """The sample as an item, its .txt / .json read; or why it cannot be one."""
    try:
        image = _image_member(sample, size)
        extra: dict[str, str | None] = {
            name: _read_extra(f, name, member, size) for name, member in sample.extra.items()
        }
    except ValueError as e:
        return (path, key, str(e))
    return _Entry(path, key, extra, MemberAt(path, image.offset_data, image.size))


def _image_member(sample: _Sample, size: int) -> tarfile.TarInfo:
    """The sample's image member, checked; a ValueError why it has none usable (`size`: the shard's)."""
    image = sample.image
    if sample.failure is not None:
        raise ValueError(sample.failure)
    if image is None:
        raise ValueError("no image member (" + ", ".join(IMAGE_EXTENSIONS) + ")")
    if not image.isreg():
        raise ValueError(f"{image.name}: not a regular file member (a link or a device)")
    if image.size > images.MAX_FILE_BYTES:
        raise ValueError(f"{image.name}: {image.size} bytes, more than the limit of {images.MAX_FILE_BYTES}")
    if image.offset_data + image.size > size:
        raise ValueError(f"{image.name}: truncated member (the shard ends inside it)")
    return image


def _read_extra(f: io.BufferedReader, extension: str, member: tarfile.TarInfo, size: int) -> str:
    """A sample's .txt (text) or .json (parsed, written back compactly) member; ValueError why not."""
    if not member.isreg():
        raise ValueError(f".{extension} member: not a regular file")
    if member.size > MAX_EXTRA_BYTES:
        raise ValueError(f".{extension} member: {member.size} bytes, more than {MAX_EXTRA_BYTES}")
    if member.offset_data + member.size > size:
        raise ValueError(f".{extension} member: truncated")
    f.seek(member.offset_data)
    try:
        text = f.read(member.size).decode("utf-8")
        return json.dumps(json.loads(text), ensure_ascii=False) if extension == "json" else text
    except UnicodeDecodeError:
        raise ValueError(f".{extension} member: not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise ValueError(".json member: not valid JSON") from None


# -- tables ---------------------------------------------------------------------------------------------------
class _Table:
    """A parquet or CSV table of images, its columns checked when opened."""

    def __init__(self, path: str, column: str, is_bytes: bool, key: str | None, keep: Sequence[str]):
        self.path, self.column, self.is_bytes, self.key, self.keep = path, column, is_bytes, key, keep
        self.folder = os.path.realpath(os.path.dirname(path) or ".")

    @classmethod
    def open(cls, path: str, column: str | None, keep: Sequence[str]) -> _Table:
        """The table at `path`, with its image column (`column`, or the first usable of IMAGE_COLUMNS);
        an InputError naming the table when a column is missing or unusable."""
        types = _parquet_types(path) if path.lower().endswith(".parquet") else _csv_types(path)
        missing = [name for name in keep if name not in types]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} to keep (columns: {_listed(types)})")
        candidates = [column] if column is not None else [n for n in IMAGE_COLUMNS if n in types]
        for name in candidates:
            if name not in types:
                raise InputError(f"{path}: no column {name!r} (columns: {_listed(types)})")
            if types[name] in ("path", "bytes"):
                key = "key" if "key" in types and name != "key" else None
                return cls(path, name, types[name] == "bytes", key, keep)
            if column is not None:
                raise InputError(f"{path}: column {name!r} holds {types[name]}, not image paths or bytes")
        raise InputError(
            f"{path}: no image column found (tried {', '.join(IMAGE_COLUMNS)}; columns: {_listed(types)}); "
            "name one with --column"
        )

    def note(self) -> str:
        kind = "image bytes" if self.is_bytes else "image paths"
        return f"{self.path}: {kind} from column {self.column!r}" + (", keys from 'key'" if self.key else "")

    def entries(self) -> Iterator[_Entry | _Failure]:
        rows = _parquet_rows if self.path.lower().endswith(".parquet") else _csv_rows
        wanted = [self.column, *([self.key] if self.key else []), *self.keep]
        for group, row_in_group, number, values in rows(self.path, wanted, self.is_bytes):
            extra = {name: _as_text(values[name]) for name in self.keep}
            written = values.get(self.column)
            key = _as_text(values[self.key]) if self.key else None
            if self.is_bytes:
                where: FileAt | CellAt = CellAt(self.path, self.column, group, row_in_group)
                yield _Entry(self.path, key or str(number), extra, where)
                continue
            key = key or (written if isinstance(written, str) else str(number))
            try:
                yield _Entry(self.path, key, extra, FileAt(self._resolve(written)))
            except ValueError as e:
                yield (self.path, key, str(e))

    def _resolve(self, written: object) -> str:
        """The file a path cell names, inside the table's folder; a ValueError saying why not."""
        if not isinstance(written, str) or not written:
            raise ValueError("no path in this row")
        if os.path.isabs(written) or "\0" in written:
            raise ValueError(f"{written!r}: an absolute path (paths in a table are relative to its folder)")
        resolved = os.path.realpath(os.path.join(self.folder, written))
        if os.path.commonpath([resolved, self.folder]) != self.folder:
            raise ValueError(f"{written!r}: leads outside the table's folder")
        return resolved


def _listed(types: dict[str, str]) -> str:
    names = list(types)
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return json.dumps(value, ensure_ascii=False, default=str)


def _pyarrow_parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("parquet inputs need pyarrow: pip install 'blip2[parquet]'") from None
    return pa, pq


def _parquet_file(path: str):
    pa, pq = _pyarrow_parquet()
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None


def _parquet_types(path: str) -> dict[str, str]:
    """Each column's kind: "path" (text), "bytes" (binary, or a struct with a binary `bytes` field), or its
    arrow type in words."""
    pa, _ = _pyarrow_parquet()
    kinds = {}
    for column in _parquet_file(path).schema_arrow:
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            kinds[column.name] = "path"
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            kinds[column.name] = "bytes"
        elif pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            inner = kind.field("bytes").type
            binary = pa.types.is_binary(inner) or pa.types.is_large_binary(inner)
            kinds[column.name] = "bytes" if binary else str(kind)
        else:
            kinds[column.name] = str(kind)
    return kinds


def _parquet_rows(path: str, wanted: list[str], is_bytes: bool) -> Iterator[tuple[int, int, int, dict]]:
    """(row group, row in it, row number, {column: value}) for each row; a bytes column is not read here."""
    pa, _ = _pyarrow_parquet()
    table_file = _parquet_file(path)
    columns = [name for name in dict.fromkeys(wanted) if not (is_bytes and name == wanted[0])]
    number = 0
    for group in range(table_file.num_row_groups):
        rows = table_file.metadata.row_group(group).num_rows
        try:
            values = table_file.read_row_group(group, columns=columns).to_pylist() if columns else None
        except (OSError, pa.ArrowException, ValueError) as e:
            raise InputError(f"{path}: row group {group} cannot be read ({e})") from None
        for row in range(rows):
            yield group, row, number, values[row] if values else {}
            number += 1


_GROUPS: dict[tuple[str, str, int], list] = {}
_GROUPS_LOCK = threading.Lock()
_GROUPS_KEPT = 2  # row groups held: the one being read and the next (decode threads overlap them)


def _row_group(path: str, column: str, group: int) -> list:
    """The values of `column` in a row group, cached: items of one group come in a row, so each group is
    read once however many threads decode its images. The lock keeps two threads from reading it twice."""
    key = (path, column, group)
    with _GROUPS_LOCK:
        if key not in _GROUPS:
            table_file = _parquet_file(path)
            index = table_file.schema_arrow.get_field_index(column)
            size = table_file.metadata.row_group(group).column(index).total_uncompressed_size
            if size > MAX_ROW_GROUP_BYTES:
                raise ImageError(f"{path}: row group {group}", f"{size} bytes, over {MAX_ROW_GROUP_BYTES}")
            values = table_file.read_row_group(group, columns=[column]).column(0).to_pylist()
            while len(_GROUPS) >= _GROUPS_KEPT:
                del _GROUPS[next(iter(_GROUPS))]
            _GROUPS[key] = values
        return _GROUPS[key]


def _csv_types(path: str) -> dict[str, str]:
    """A CSV's columns (its header), all text: paths."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from None
    if not header:
        raise InputError(f"{path}: an empty CSV file (no header row)")
    return dict.fromkeys(header, "path")


def _csv_rows(path: str, wanted: list[str], is_bytes: bool) -> Iterator[tuple[int, int, int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.DictReader(f)):
                yield 0, number, number, {name: row.get(name) for name in wanted}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: CSV unreadable past some rows ({e})") from None
