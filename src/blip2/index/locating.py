"""Where an indexed image's bytes are, so that thumbnails, re-ranking and captioning read them again through
the job inputs' readers (`blip2.jobs.inputs.Item.read`: capped at the image size limit).

An image file is its row's path. An image inside a tar shard or a table has a row with its `source` (the
shard or table, absolute), its `key` there, its display name `SOURCE#KEY` as path, and a `locator`, JSON text:
`{"member": [offset, size]}` (a tar member), `{"cell": [column, row group, row]}` (a parquet bytes cell), or
`{"file": "relative/path"}` (a table's path cell, relative to the table's folder). An index file may be
crafted: a locator is parsed and bounded, and never reads anything but the recorded source (a member or a
cell) or a file inside the source's folder (a path cell), at most the image size limit. A row without a
locator (added from embeddings made elsewhere, its source since changed) is found by reading its source again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from .. import images
from ..errors import Blip2Error, ImageError
from ..jobs.inputs import TABLE_SUFFIXES, CellAt, Failed, FileAt, Item, MemberAt, expand_inputs
from .store import MAX_LOCATOR_CHARS, Row

__all__ = ["display_name", "holder", "is_gone", "item_of", "left_their_shards", "locator_of", "read_row"]


def display_name(source: str, key: str) -> str:
    """How the index names an image inside a shard or table (its row's path): `SOURCE#KEY`."""
    return f"{source}#{key}"


def holder(item: Item) -> str:
    """The file whose size and mtime cover `item`'s bytes: the image file, the shard, the table, or the file a
    table's path cell names."""
    return item.where.path if item.where is not None else item.source


def locator_of(item: Item, source: str) -> str | None:
    """The locator of an item from `expand_inputs` (None for an image file), `source` being its stored
    (absolute) source."""
    where = item.where
    if isinstance(where, MemberAt):
        return json.dumps({"member": [where.offset, where.size]})
    if isinstance(where, CellAt):
        return json.dumps({"cell": [where.column, where.group, where.row]})
    if isinstance(where, FileAt) and item.key != item.source:
        folder = os.path.realpath(os.path.dirname(source))
        return json.dumps({"file": os.path.relpath(os.path.realpath(where.path), folder)})
    return None


def item_of(row: Row) -> Item:
    """The row as a job input whose `read()` gives its image's bytes; an ImageError naming it when its
    locator is malformed or leads outside its source."""
    if row.source is None or row.key is None:
        return Item(0, row.path, row.path)
    if row.locator is None:
        return _found_again(row)
    return Item(0, row.source, row.key, {}, _where(row, _parsed(row)))


def read_row(row: Row) -> bytes:
    """The bytes of a row's image (an ImageError naming it when they cannot be read); for an image inside a
    shard or table, checked against the row's content hash (a shard rewritten since it was indexed)."""
    data = item_of(row).read()
    if row.source is not None and not row.hash.startswith("embedding:"):
        if hashlib.sha256(data).hexdigest() != row.hash:
            raise ImageError(row.path, "changed since it was indexed (index add it again)")
    return data


def is_gone(row: Row) -> bool:
    """Whether the row's file (for an image inside a shard or table: its source) no longer exists."""
    return not os.path.lexists(row.source if row.source is not None else row.path)


def _parsed(row: Row) -> Any:
    text = row.locator or ""
    if len(text) > MAX_LOCATOR_CHARS:
        raise ImageError(row.path, "a malformed locator in the index")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ImageError(row.path, "a malformed locator in the index") from None


def _where(row: Row, locator: Any) -> MemberAt | CellAt | FileAt:
    """The reader a parsed locator names, checked (see the module docstring)."""
    assert row.source is not None
    kind, value = "", None  # type: tuple[str, Any]
    if isinstance(locator, dict) and len(locator) == 1:
        kind, value = next(iter(locator.items()))
    if kind == "member" and _counts(value, 2) and 0 < value[1] <= images.MAX_FILE_BYTES:
        return MemberAt(row.source, value[0], value[1])
    if kind == "cell" and isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        if _counts(value[1:], 2):
            return _CheckedCell(row.source, value[0], value[1], value[2])
    if kind == "file" and isinstance(value, str) and value and "\0" not in value and not os.path.isabs(value):
        folder = os.path.realpath(os.path.dirname(row.source))
        resolved = os.path.realpath(os.path.join(folder, value))
        if os.path.commonpath([resolved, folder]) == folder:
            return FileAt(resolved)
        raise ImageError(row.path, "its locator leads outside its table's folder")
    raise ImageError(row.path, "a malformed locator in the index")


def _counts(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


class _CheckedCell(CellAt):
    """A parquet cell of a locator read from the index: a row group or row out of range (a crafted index, or
    a table rewritten since) is an ImageError, not pyarrow's exception."""

    def read(self, name: str) -> bytes:
        try:
            return super().read(name)
        except Blip2Error:
            raise
        except (IndexError, KeyError, OSError, TypeError, ValueError) as e:
            raise ImageError(name, f"cannot read its table cell ({e})") from None


def _found_again(row: Row) -> Item:
    """The row's image found by reading its source again (a row added from embeddings without a locator)."""
    assert row.source is not None
    if not row.source.lower().endswith((".tar", *TABLE_SUFFIXES)):
        raise ImageError(row.path, "its source is not a tar shard or a table")
    try:
        for item in expand_inputs([row.source]):
            if isinstance(item, Item) and item.key == row.key:
                return item
    except Blip2Error as e:
        raise ImageError(row.path, f"its source cannot be read ({e})") from None
    raise ImageError(row.path, "no longer in its source")


def left_their_shards(rows: Sequence[Row]) -> list[str]:
    """The paths of the rows of images no longer in their tar shard (its headers read again; a shard that
    cannot be read at all keeps its rows). Tables are not read again: their rows go with the table."""
    by_source: dict[str, list[Row]] = {}
    for row in rows:
        if row.source is not None and row.source.lower().endswith(".tar"):
            by_source.setdefault(row.source, []).append(row)
    gone = []
    for source, members in by_source.items():
        expanded = [*expand_inputs([source])]
        if any(isinstance(x, Failed) and x.key == x.source for x in expanded):
            continue
        keys = {x.key for x in expanded}
        gone += [row.path for row in members if row.key not in keys]
    return gone
