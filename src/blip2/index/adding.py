"""What `Index.add` does with each input (`blip2.jobs.inputs.expand_inputs`: image files, images inside tar
shards and tables): decide (unchanged, moved, copied, changed, new) from where it is, its holder file's size and
mtime and its content hash against the stored rows, then embed what needs it, a batch at a time, each batch
its own commit. Each input is read once (in the decode threads): hashed, then decoded from the same bytes.

An image file is stored at its absolute path; an image inside a shard or table at `SOURCE#KEY`, with its
source (absolute), key and locator (see `locating`). Its holder is the file its bytes are in: the image file,
the shard, a bytes table, or the file a table's path cell names.

Decisions, in order, for an input stored at P whose holder has size S and mtime M:
- a row at P with the same S and M: unchanged, not even read (as rsync and git do; a file rewritten with the
  same size within the mtime resolution is missed, the price of not reading a million files again);
- else it is read and hashed (sha256); a row at P with that hash: unchanged (its size, mtime, locator
  refreshed: a shard rewritten around an unchanged member);
- rows elsewhere with that hash: a row whose file (or source) is gone is moved to P (its vector kept); else
  P gets a copy of a row's vector (a copied file); either way no model call;
- else P is embedded: "re-embedded" when it had a row (changed content), "added" when new.

A shard or bytes table read completely (every member settled, none failed) is recorded with its size and
mtime; found so again, it is not opened at all and its rows count as unchanged. Members gone from a shard
that changed keep their rows (as files gone from a folder do) until `prune`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import numpy as np

from ..errors import Blip2Error, ImageError
from ..jobs.inputs import TABLE_SUFFIXES, Failed, Item, expand_inputs
from ..sources import Skipped
from . import locating
from .store import NewRow, Store

Progress = Callable[[int, int], None]  # (inputs done, inputs in all)


@dataclass
class AddReport:
    """What `Index.add` did with each file it was given (paths as stored: absolute)."""

    added: list[str] = field(default_factory=list)
    reembedded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)  # (old path, new path)
    copied: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    embedded: int = 0  # images run through the model (added + re-embedded)

    def summary(self) -> str:
        """One line: how many of each."""
        parts = [
            f"{len(self.added)} added",
            f"{len(self.reembedded)} re-embedded",
            f"{len(self.unchanged)} unchanged",
            f"{len(self.moved)} moved",
            f"{len(self.copied)} copied",
            f"{len(self.skipped)} skipped",
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class Input:
    """An input as the index stores it: its row's path, source, key and locator (`NewRow`, hash and image
    facts still unknown), the item that reads it, and the size and mtime of its holder."""

    row: NewRow
    item: Item

    @classmethod
    def of(cls, item: Item) -> Input:
        """The input of an item; an OSError when its holder cannot be stat'ed."""
        info = os.stat(locating.holder(item))
        size, mtime = info.st_size, info.st_mtime
        if item.key == item.source:  # an image file
            return cls(NewRow(os.path.abspath(item.source), "", size, mtime, 0, 0), item)
        source = os.path.abspath(item.source)
        locator = locating.locator_of(item, source)
        name = locating.display_name(source, item.key)
        return cls(NewRow(name, "", size, mtime, 0, 0, None, source, item.key, locator), item)


class Settled(Blip2Error):
    """An input that needs no model call: unchanged by size and mtime (`hash` None), or read and hashed
    (`hash`), its decision left to `settle` on the committing thread."""

    def __init__(self, row: NewRow, hash: str | None):
        super().__init__(row.path)
        self.row, self.hash = row, hash


@dataclass(frozen=True)
class Pending:
    """An input to embed: its row (hash and holder's size and mtime known) and whether it replaces one."""

    row: NewRow
    changed: bool  # it had a row with other content


@dataclass(frozen=True)
class Decoded:
    """An input decoded for the models: the model-size image(s) and the original size."""

    pending: Pending
    image: Any  # PIL image at the retrieval model's input size
    caption_image: Any  # at the captioning model's input size, or None
    width: int
    height: int


def preparer(store: Store, model, caption_model) -> Callable[[Input], Decoded]:
    """What the decode threads do with an input: settle it by size and mtime without reading it, or read it
    once, hash it, and either leave it to `settle` (a row with that content exists) or decode it for the
    models (raising Settled, or an ImageError naming it)."""
    from ..images import fit, load_image

    def prepare(given: Input) -> Decoded:
        new = given.row
        row = store.get(new.path)
        if row is not None and (row.size, row.mtime) == (new.size, new.mtime):
            raise Settled(new, None)
        try:
            data = given.item.read()
        except ImageError as e:
            raise ImageError(new.path, e.reason) from None
        digest = hashlib.sha256(data).hexdigest()
        new = replace(new, hash=digest)
        if (row is not None and row.hash == digest) or any(r.path != new.path for r in store.by_hash(digest)):
            raise Settled(new, digest)
        try:
            image = load_image(data)
        except ImageError as e:
            raise ImageError(new.path, e.reason) from None
        extra = fit(image, caption_model.image_config) if caption_model is not None else None
        pending = Pending(replace(new, width=image.width, height=image.height), changed=row is not None)
        return Decoded(pending, fit(image, model.image_config), extra, image.width, image.height)

    return prepare


def settle(store: Store, settled: Settled, report: AddReport, touched: list[NewRow]) -> None:
    """Carry out the decision for an input that needs no model: unchanged (its new size, mtime and locator
    left in `touched`, for `Store.touch`), moved or copied."""
    new, digest = settled.row, settled.hash
    row = store.get(new.path)
    if digest is None or (row is not None and row.hash == digest):
        if digest is not None:
            touched.append(new)  # the same content touched, or its shard rewritten around it
        report.unchanged.append(new.path)
        return
    twins = [r for r in store.by_hash(digest) if r.path != new.path]
    if row is not None:
        store.remove([new.path])  # its old content is gone; the twin's vector takes its place
    gone = next((r for r in twins if locating.is_gone(r)), None)
    if gone is not None:
        store.relocate(gone.path, new)
        report.moved.append((gone.path, new.path))
    else:
        twin = twins[0]
        store.copy_vectors(
            replace(new, width=twin.width, height=twin.height, caption=twin.caption), twin.slot
        )
        report.copied.append(new.path)


@dataclass(frozen=True)
class Embedded:
    """An input's row (with its image size and caption) and its vectors from the models."""

    row: NewRow
    vectors: np.ndarray  # (Q, D) float32, L2-normalised: image_embeds_proj
    changed: bool


def embedder(model, caption_model) -> Callable[[list[Decoded]], list[Embedded]]:
    """The model calls for a batch of decoded inputs: the projected query embeddings, and a caption."""

    def run(batch: list[Decoded]) -> list[Embedded]:
        vectors = model.embed_images([d.image for d in batch])["image_embeds_proj"].numpy()  # (B, Q, D)
        captions: list[str | None] = [None] * len(batch)
        if caption_model is not None:
            captions = list(caption_model.caption([d.caption_image for d in batch]))
        return [
            Embedded(replace(d.pending.row, caption=c), v, d.pending.changed)
            for v, c, d in zip(vectors, captions, batch)
        ]

    return run


def commit_batches(
    store: Store,
    results: Iterator[tuple[Input, Embedded | Blip2Error]],
    batch_size: int,
    report: AddReport,
    progress: Callable[[int], None],
) -> None:
    """Commit `results` (each input with its `Embedded`, its `Settled` decision, or the ImageError that
    stopped it) one batch at a time, the embedded ones in one transaction each: a kill loses at most the
    batch in flight. Another Blip2Error (a damaged index) stops the add."""
    while chunk := list(islice(results, batch_size)):
        rows, vectors = [], []
        touched: list[NewRow] = []
        for given, result in chunk:
            if isinstance(result, Settled):
                settle(store, result, report, touched)
            elif isinstance(result, ImageError):
                report.skipped.append(Skipped(given.row.path, result.reason))
            elif isinstance(result, Blip2Error):
                raise result
            else:
                rows.append(result.row)
                vectors.append(result.vectors)
                (report.reembedded if result.changed else report.added).append(result.row.path)
        store.touch(touched)  # one transaction for the chunk's, not one (and its fsync) each
        if rows:
            store.add(rows, np.stack(vectors))
            report.embedded += len(rows)
        progress(len(chunk))


def caption_missing(
    store: Store, paths: Sequence[str], caption_model, batch_size: int, report: AddReport
) -> None:
    """Caption the rows at `paths` that have no caption yet (indexed before, without a captioning model),
    their images read and decoded again. One that cannot be read keeps its row, uncaptioned, and is
    reported."""
    from ..images import load_resized
    from ..tasks.batch import DECODE_WORKERS, each_input

    missing = [row for path in paths if (row := store.get(path)) is not None and row.caption is None]
    results = each_input(
        missing,
        batch_size,
        lambda row: load_resized(locating.read_row(row), caption_model.image_config),
        lambda good: caption_model.caption(good),
        workers=DECODE_WORKERS,
    )
    for row, result in results:
        if isinstance(result, Blip2Error):
            reason = result.reason if isinstance(result, ImageError) else str(result)
            report.skipped.append(Skipped(row.path, f"indexed, but not captioned: {reason}"))
        else:
            store.set_caption(row.path, result)


def inputs_of(expanded: Sequence[Item | Failed], report: AddReport) -> list[Input]:
    """The inputs to settle or embed, each stored path once, in order; the failed ones, those whose holder
    is gone and names the index cannot store go to `report.skipped`."""
    found: dict[str, Input] = {}
    for item in expanded:
        if isinstance(item, Failed):
            source = os.path.abspath(item.source)
            name = item.source if item.key == item.source else locating.display_name(source, item.key)
            report.skipped.append(Skipped(name, item.reason))
            continue
        try:
            given = Input.of(item)
        except OSError as e:
            report.skipped.append(Skipped(item.name, f"cannot read: {e.strerror or e}"))
            continue
        if not storable(given.row.path):
            report.skipped.append(
                Skipped(given.row.path, "the file name is not valid UTF-8, which the index cannot store")
            )
            continue
        found.setdefault(given.row.path, given)
    return list(found.values())


def storable(path: str) -> bool:
    """Whether `path` is text SQLite can store: a name that is not UTF-8 reaches Python with lone surrogates."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unchanged_source(store: Store, report: AddReport) -> Callable[[str], bool]:
    """`expand_inputs`' skip: whether a shard or bytes table was read completely at its present size and
    mtime (then it is not opened: its rows count as unchanged)."""

    def skip(path: str) -> bool:
        source = os.path.abspath(path)
        try:
            info = os.stat(source)
        except OSError:
            return False
        if store.source_read(source) != (info.st_size, info.st_mtime):
            return False
        report.unchanged.extend(row.path for row in store.by_source(source))
        return True

    return skip


def record_sources(store: Store, inputs: Sequence[Input], failed: set[str], report: AddReport) -> None:
    """Record the shards and bytes tables this add read completely (each member settled or embedded; none
    failed, their sources in `failed`, nor skipped) at the size and mtime they had when opened; forget the
    others, to be read again next time."""
    skipped = {s.path for s in report.skipped}
    states: dict[str, tuple[int, float] | None] = {}
    for given in inputs:
        row = given.row
        if row.source is None or not (row.locator or "").startswith(('{"member"', '{"cell"')):
            continue  # an image file, or a table's path cell: its own file's size and mtime decide
        good = row.source not in failed and row.path not in skipped
        state: tuple[int, float] | None = (row.size, row.mtime)
        states[row.source] = state if good and states.get(row.source, state) is not None else None
    for source, state in states.items():
        store.set_source_read(source, *(state or (None,)))


def member_rows(members: Sequence[tuple[str, str, str]]) -> list[NewRow]:
    """The rows of images inside tar shards or tables whose vectors were made elsewhere, given as (source, key,
    hash) (an embed job's rows): located as `Index.add` locates them, each source read again (a shard's
    headers, a table's key column) when it is here, so that the rows equal those `add` would store but for
    the image sizes (unknown: 0). A source not here, or a key no longer in it, gets a row without locator
    (`add` of the source later completes it)."""
    found: dict[str, dict[str, Item]] = {}
    for source in dict.fromkeys(source for source, _, _ in members):
        found[source] = {}
        if source.lower().endswith((".tar", *TABLE_SUFFIXES)) and os.path.isfile(source):
            try:
                found[source] = {x.key: x for x in expand_inputs([source]) if isinstance(x, Item)}
            except Blip2Error:
                pass  # a table whose image column is not found by name: rows without locator
    return [_member_row(found[source].get(key), source, key, digest) for source, key, digest in members]


def _member_row(item: Item | None, source: str, key: str, digest: str) -> NewRow:
    """`member_rows`' row of one image (`item`: found in its source)."""
    if item is not None:
        try:
            return replace(Input.of(item).row, hash=digest)
        except OSError:
            pass  # its source went away meanwhile
    stored = os.path.abspath(source) if os.path.exists(source) else source
    return NewRow(locating.display_name(stored, key), digest, 0, 0.0, 0, 0, None, stored, key, None)
