"""What `Index.add` does with each file: decide (unchanged, moved, copied, changed, new) from the path, size,
mtime and content hash against the stored rows, then embed what needs it, a batch at a time, each batch its
own commit.

Decisions, in order, for a file at path P with size S and mtime M:
- a row at P with the same S and M: unchanged, not even read (as rsync and git do; a file rewritten with the
  same size within the mtime resolution is missed, the price of not reading a million files again);
- else the file is hashed (sha256, streamed); a row at P with that hash: unchanged (its mtime refreshed);
- rows elsewhere with that hash: a row whose file is gone is moved to P (its vector kept); else P gets a copy
  of a row's vector (a copied file); either way no model call;
- else P is embedded: "re-embedded" when it had a row (changed content), "added" when new.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from ..errors import Blip2Error, ImageError
from ..sources import Skipped
from .store import NewRow, Row, Store

HASH_CHUNK = 1 << 20  # bytes read at a time when hashing

Progress = Callable[[int, int], None]  # (files done, files in all)


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
class Pending:
    """A file to embed, with what is known of it from planning."""

    path: str
    hash: str
    size: int
    mtime: float
    changed: bool  # it had a row with other content


def file_hash(path: str) -> str:
    """sha256 of the file's content, read a chunk at a time (hex). Only a regular file is read (a FIFO
    swapped in since it was found would block the read: an OSError)."""
    digest = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def plan(store: Store, paths: Sequence[str], report: AddReport, progress: Progress) -> list[Pending]:
    """Settle every file that needs no model (unchanged, moved, copied: each committed at once) and return
    the ones to embed, in input order. Files that cannot be read are added to `report.skipped`."""
    pending: list[Pending] = []
    for done, path in enumerate(paths, 1):
        try:
            info = os.stat(path)
            row = store.get(path)
            if row is not None and row.size == info.st_size and row.mtime == info.st_mtime:
                report.unchanged.append(path)
            else:
                digest = file_hash(path)
                todo = _settle(store, path, digest, info, row, report)
                if todo is not None:
                    pending.append(todo)
        except OSError as e:
            report.skipped.append(Skipped(path, f"cannot read: {e.strerror or e}"))
        progress(done - len(pending), len(paths))
    return pending


def _settle(
    store: Store, path: str, digest: str, info: os.stat_result, row: Row | None, report: AddReport
) -> Pending | None:
    """Unchanged, moved or copied (done here); else the file to embed."""
    if row is not None and row.hash == digest:
        store.move(path, path, info.st_mtime)  # the same content touched: refresh the mtime
        report.unchanged.append(path)
        return None
    twins = [r for r in store.by_hash(digest) if r.path != path]
    if not twins:
        return Pending(path, digest, info.st_size, info.st_mtime, changed=row is not None)
    if row is not None:
        store.remove([path])  # its old content is gone; the twin's vector takes its place
    gone = next((r for r in twins if not os.path.lexists(r.path)), None)
    if gone is not None:
        store.move(gone.path, path, info.st_mtime)
        report.moved.append((gone.path, path))
    else:
        twin = twins[0]
        new = NewRow(path, digest, info.st_size, info.st_mtime, twin.width, twin.height, twin.caption)
        store.copy_vectors(new, twin.slot)
        report.copied.append(path)
    return None


@dataclass(frozen=True)
class Decoded:
    """A file decoded for the models: the model-size image(s) and the original size."""

    image: Any  # PIL image at the retrieval model's input size
    caption_image: Any  # at the captioning model's input size, or None
    width: int
    height: int


def decoder(model, caption_model) -> Callable[[Pending], Decoded]:
    """Decode a pending file once, resized for each model (raises ImageError naming it)."""
    from ..images import load_image, resize

    def sized(image, engine):
        return resize(image, engine.image_config) if engine.image_config.do_resize else image

    def decode(item: Pending) -> Decoded:
        image = load_image(item.path)
        extra = sized(image, caption_model) if caption_model is not None else None
        return Decoded(sized(image, model), extra, image.width, image.height)

    return decode


@dataclass(frozen=True)
class Embedded:
    """A file's row data from the models."""

    vectors: np.ndarray  # (Q, D) float32, L2-normalised: image_embeds_proj
    caption: str | None
    width: int
    height: int


def embedder(model, caption_model) -> Callable[[list[Decoded]], list[Embedded]]:
    """The model calls for a batch of decoded files: the projected query embeddings, and a caption."""

    def run(batch: list[Decoded]) -> list[Embedded]:
        vectors = model.embed_images([d.image for d in batch])["image_embeds_proj"].numpy()  # (B, Q, D)
        captions: list[str | None] = [None] * len(batch)
        if caption_model is not None:
            captions = list(caption_model.caption([d.caption_image for d in batch]))
        return [Embedded(v, c, d.width, d.height) for v, c, d in zip(vectors, captions, batch)]

    return run


def commit_batches(
    store: Store,
    results: Iterator[tuple[Pending, Embedded | Blip2Error]],
    batch_size: int,
    report: AddReport,
    progress: Callable[[int], None],
) -> None:
    """Commit `results` (each pending file with its `Embedded` or the Blip2Error that stopped it) one batch
    at a time, in one transaction each: a kill loses at most the batch in flight."""
    while chunk := list(islice(results, batch_size)):
        rows, vectors = [], []
        for item, result in chunk:
            if isinstance(result, Blip2Error):
                reason = result.reason if isinstance(result, ImageError) else str(result)
                report.skipped.append(Skipped(item.path, reason))
                continue
            rows.append(
                NewRow(
                    item.path, item.hash, item.size, item.mtime, result.width, result.height, result.caption
                )
            )
            vectors.append(result.vectors)
            (report.reembedded if item.changed else report.added).append(item.path)
        if rows:
            store.add(rows, np.stack(vectors))
            report.embedded += len(rows)
        progress(len(chunk))


def caption_missing(
    store: Store, paths: Sequence[str], caption_model, batch_size: int, report: AddReport
) -> None:
    """Caption the rows at `paths` that have no caption yet (indexed before, without a captioning model),
    their files decoded again. A file that cannot be read keeps its row, uncaptioned, and is reported."""
    from ..images import load_resized
    from ..tasks.batch import DECODE_WORKERS, each_input

    missing = [path for path in paths if (row := store.get(path)) is not None and row.caption is None]
    results = each_input(
        missing,
        batch_size,
        lambda path: load_resized(path, caption_model.image_config),
        lambda good: caption_model.caption(good),
        workers=DECODE_WORKERS,
    )
    for path, result in results:
        if isinstance(result, Blip2Error):
            reason = result.reason if isinstance(result, ImageError) else str(result)
            report.skipped.append(Skipped(path, f"indexed, but not captioned: {reason}"))
        else:
            store.set_caption(path, result)
