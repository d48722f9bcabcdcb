"""`Index`: a persistent image search index over a folder on disk (store.py), searched with the exact
BLIP-2 ITC score (exact.py), accelerated above `ann.BRUTE_FORCE_BELOW` images by an ANN stage (ann.py), and
optionally re-ranked by the ITM head.

The index is bound to the checkpoint that made its vectors by a fingerprint of its ITC space (`fingerprint`):
searching or adding with another checkpoint is an IndexMismatchError, never silently wrong scores.
Writers (add, remove, prune, add_embeddings) hold the index's lock; searches take none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Blip2Error, CheckpointError, ImageError, IndexMismatchError, InputError
from . import adding, locating
from .adding import AddReport, Progress, storable
from .ann import BRUTE_FORCE_BELOW, AnnIndex
from .ann import search as ranked
from .store import ANN_FILES, Meta, NewRow, Row, Store, Where, open_store

DEFAULT_LOCK_TIMEOUT = 10.0  # seconds a writer waits for another one to finish
EMBEDDINGS_BATCH = 4096  # rows per transaction in add_embeddings (32 MiB of fp16 vectors at 32x256)
# The ITC projections of a checkpoint, whose sign bits identify its embedding space (see `fingerprint`).
FINGERPRINT_PARAMETERS = (
    "query_tokens",
    "vision_projection.weight",
    "vision_projection.bias",
    "text_projection.weight",
    "text_projection.bias",
)


@dataclass(frozen=True)
class Hit:
    """One search result: its rank (1-based), the image's path (`SOURCE#KEY` for one inside a tar shard or
    table), its ITC score; `match` (the ITM probability) when re-ranked, or `error` when the image could not be
    read again for it; and the stored row's fields (`source`, `key`, `locator`: see `blip2.index.locating`)."""

    rank: int
    image: str
    score: float
    match: float | None = None
    error: str | None = None
    hash: str = ""
    size: int = 0
    mtime: float = 0.0
    width: int = 0
    height: int = 0
    caption: str | None = None
    source: str | None = None
    key: str | None = None
    locator: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """`{"rank", "image", "score"}`, plus `"source"` and `"key"` for an image inside a tar shard or table,
        and `"match"` (or `"error"`) when re-ranked."""
        record: dict[str, Any] = {"rank": self.rank, "image": self.image, "score": self.score}
        if self.source is not None:
            record |= {"source": self.source, "key": self.key}
        if self.match is not None:
            record["match"] = self.match
        if self.error is not None:
            record["error"] = self.error
        return record


def fingerprint(model) -> str:
    """The identity of a retrieval checkpoint's ITC space: sha256 over the shapes and the *sign bits* of its
    query tokens and ITC projections. Signs survive any float dtype conversion exactly (rounding never flips
    a sign; an underflow keeps a signed zero), so one checkpoint loaded in float32 on the CPU and in float16
    on a GPU has one fingerprint, while another checkpoint (fine-tuned, or another size) differs in some of
    its ~400k signs."""
    import torch

    module = model.model
    if not hasattr(module, "vision_projection"):
        raise CheckpointError(f"{model.name} has no ITC projection: the index needs a retrieval checkpoint")
    digest = hashlib.sha256(b"blip2-itc-signs/1")
    for name in FINGERPRINT_PARAMETERS:
        weight = module.get_parameter(name).detach()
        digest.update(f"{name}{tuple(weight.shape)}".encode())
        digest.update(np.packbits(torch.signbit(weight).cpu().numpy()).tobytes())
    return "signs-sha256:" + digest.hexdigest()


class Index:
    """A search index in the folder `path` (created by the first add).

    `model`: a retrieval checkpoint (`blip2.load("Salesforce/blip2-itm-vit-g")`), needed to add images and
    to search by text or image; not for `add_embeddings`, searching by embedding, remove, prune or info.
    `lock_timeout`: seconds a writer waits for another writer before an IndexBusyError. `resident`: fault
    the whole vector file into memory in a background thread when searching starts (`blip2.index.resident`):
    for a long-lived searcher such as the HTTP service, whose queries then read no page from disk; it costs
    page cache the size of the vectors (16 KB per image), never an out-of-memory kill.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model=None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        resident: bool = False,
    ):
        self.path = Path(path)
        self.model = model
        self.lock_timeout = lock_timeout
        self.resident = resident
        self._fingerprint: str | None = None
        self._reader: Store | None = None
        self._ann: tuple[tuple, AnnIndex | None] | None = None  # (ann files' identity, loaded index)

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, model={getattr(self.model, 'name', None)!r})"

    def __len__(self) -> int:
        """The number of images in the index (0 before the first add)."""
        if not self.path.exists():
            return 0
        return len(self._store())

    def close(self) -> None:
        """Close the reader kept open between searches (the index reopens it when used again)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._ann = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- adding ---------------------------------------------------------------------------------------------
    def add(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        batch_size: int | None = None,
        caption_model=None,
        progress: Progress | None = None,
        column: str | None = None,
    ) -> AddReport:
        """Index images: `paths` are what a job takes (`blip2.jobs.inputs.expand_inputs`): image files,
        folders (recursive), globs, @lists, WebDataset tar shards (brace patterns too) and parquet / CSV
        tables (their image `column`: paths or bytes; default: found by name). Unchanged images are skipped
        (an unchanged shard is not even opened), changed ones re-embedded, moved and copied ones take their
        stored vector (see `blip2.index.adding`); the rest is embedded `batch_size` at a time (default: the
        model's), each batch committed on its own. Inputs that cannot be read or decoded (files, shard
        members, table rows) are in the report's `skipped` with their reason. With `caption_model` (a
        captioning checkpoint), each embedded image is captioned too, and so are the images given that are
        indexed without a caption, for `search(where=Where(caption=...))`. A table without `column` is an
        InputError before anything changes.

        `progress(done, total)` is called as inputs are settled."""
        from ..jobs.inputs import Failed, expand_inputs

        names = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        report = AddReport()
        tell = progress or (lambda done, total: None)
        with self._writer() as store:
            if self.model is not None:
                self._bind(store)  # another checkpoint fails before anything changes
            skip = adding.unchanged_source(store, report)
            expanded = [*expand_inputs([os.fspath(n) for n in names], column=column, skip=skip)]
            failed = {os.path.abspath(x.source) for x in expanded if isinstance(x, Failed)}
            inputs = adding.inputs_of(expanded, report)
            if inputs:
                self._bind(store)  # (without a model: the error that says one is needed)
                self._embed(store, inputs, batch_size, caption_model, report, tell)
            adding.record_sources(store, inputs, failed, report)
            if caption_model is not None:
                kept = [*report.unchanged, *(new for _, new in report.moved), *report.copied]
                adding.caption_missing(
                    store, kept, caption_model, batch_size or caption_model.batch_size, report
                )
            self._update_ann(store)
        return report

    def _embed(
        self,
        store: Store,
        inputs: list[adding.Input],
        batch_size: int | None,
        caption_model,
        report: AddReport,
        tell: Progress,
    ) -> None:
        """Settle or embed (and caption) the inputs, reading and decoding the next batch while the model runs."""
        from ..tasks.batch import DECODE_WORKERS, each_input

        size = batch_size or self.model.batch_size
        results = each_input(
            inputs,
            size,
            adding.preparer(store, self.model, caption_model),
            adding.embedder(self.model, caption_model),
            workers=DECODE_WORKERS,
        )
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            tell(done, len(inputs))

        adding.commit_batches(store, results, size, report, advance)

    def add_embeddings(
        self,
        keys: Sequence[str],
        embeddings: np.ndarray,
        model_name: str | None = None,
        sources: Sequence[str] | None = None,
        hashes: Sequence[str] | None = None,
    ) -> int:
        """Add vectors made elsewhere (e.g. by `blip2 embed`): `embeddings` (N, Q, D), the projected query
        embeddings (`image_embeds_proj`) of the images named by `keys`, which must fit the index's (Q, D).
        No model is run. A key that names an existing file is stored as its absolute path with its size
        and mtime, so that a later `add` of that file finds it unchanged; other keys are stored as given.
        With `sources` (an embed job's rows), an image whose source is not its key is one inside that tar
        shard or table, stored as `add` stores it (`SOURCE#KEY`, located in its source when that is here);
        `hashes`, the sha256 of each image's bytes (a job's `sha256`), are stored as their content hashes
        (else a hash of the vectors, which never passes for a file's). Vectors are L2-normalised here (a no-op
        for `blip2 embed`'s). Without a model, `model_name` is recorded as the index's model when it has none
        (the checkpoint `blip2 search` then loads by default). Returns the number added."""
        vectors = _as_vectors(embeddings, len(keys)).astype("<f2")  # as stored: converted once, hashed as is
        for given in (sources, hashes):
            if given is not None and len(given) != len(keys):
                raise InputError(f"{len(keys)} keys, but {len(given)} sources or hashes")
        for key in [*keys, *(sources or ())]:
            if not isinstance(key, str) or not storable(key):
                raise InputError(
                    f"{key!r}: a key must be text (a file name that is not UTF-8 cannot be stored)"
                )
        rows = [
            _embedding_row(key, v, hashes[i] if hashes else None)
            for i, (key, v) in enumerate(zip(keys, vectors))
        ]
        if sources is not None:
            members = [i for i, (source, key) in enumerate(zip(sources, keys)) if source != key]
            located = adding.member_rows([(sources[i], keys[i], rows[i].hash) for i in members])
            for i, row in zip(members, located):
                rows[i] = row
        with self._writer() as store:
            if self.model is not None:
                self._bind(store)
            else:
                store.bind(vectors.shape[1], vectors.shape[2], store.meta().model or model_name or "", "")
            for start in range(0, len(rows), EMBEDDINGS_BATCH):  # a kill loses one batch at most
                store.add(rows[start : start + EMBEDDINGS_BATCH], vectors[start : start + EMBEDDINGS_BATCH])
            self._update_ann(store)
        return len(rows)

    def _bind(self, store: Store) -> None:
        """Bind the index to the model (first add), or check that it is the one it was made with."""
        model = self._require_model("add images")
        config = model.config
        store.bind(config.num_query_tokens, config.image_text_hidden_size, model.name, self.fingerprint)

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (see `fingerprint`), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._require_model("fingerprint"))
        return self._fingerprint

    def _update_ann(self, store: Store) -> None:
        """Build the ANN stage once the index holds `BRUTE_FORCE_BELOW` images, extend it with the slots added
        since, and rebuild it when it is missing or unusable."""
        live = store.live_slots()
        if len(live) < BRUTE_FORCE_BELOW:
            return
        meta = store.meta()
        assert meta.num_query is not None and meta.dim is not None
        ann = AnnIndex.load(store.path, meta.num_query, meta.dim, n_slots=meta.slots)
        if ann is None:
            ann = AnnIndex.build(store.vectors(), live)
        else:
            tail = live[live >= ann.covered]
            if not len(tail):
                return
            ann.add(store.vectors(), tail)
        ann.save(store.path)

    # -- removing -------------------------------------------------------------------------------------------
    def remove(self, paths: Iterable[str | os.PathLike]) -> int:
        """Drop the rows of `paths` (as given, or as absolute paths): image files, `SOURCE#KEY` (one image
        inside a tar shard or table), or a shard or table (all its images); returns how many were dropped."""
        keys = []
        for path in paths:
            given = os.fsdecode(path)
            keys += [given, os.path.abspath(given)]
            # SOURCE#KEY with a relative source: the key may hold '#' too, so each split is tried
            keys += [os.path.abspath(given[:i]) + given[i:] for i, c in enumerate(given) if c == "#" and i]
        keys = [key for key in dict.fromkeys(keys) if storable(key)]
        if not self.path.exists():
            return 0
        with self._writer() as store:
            members = [row.path for key in keys for row in store.by_source(key)]
            return store.remove([*keys, *members])

    def prune(self) -> list[str]:
        """Drop the rows whose file no longer exists, and those of images inside a tar shard or table that no
        longer exists, or that are no longer in their tar shard; returns their paths."""
        if not self.path.exists():
            return []
        with self._writer() as store:
            rows = store.rows()
            gone = [row.path for row in rows if locating.is_gone(row)]
            gone += locating.left_their_shards([row for row in rows if not locating.is_gone(row)])
            store.remove(gone)
        return gone

    def compact(self) -> None:
        """Reclaim the disk space of removed and replaced images (their vectors stay in the vector file until
        then): the vectors are rewritten without them, and the ANN stage rebuilt when the index has one."""
        if not self.path.exists():
            return
        with self._writer() as store:
            store.compact()
            self._update_ann(store)

    # -- searching ------------------------------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        image=None,
        embedding: np.ndarray | None = None,
        k: int = 10,
        rerank: bool = False,
        rerank_k: int = 100,
        where: Where | None = None,
    ) -> list[Hit]:
        """The `k` best images for one query, best first: `text`, `image` (a path, bytes, PIL image or array)
        or `embedding` ((D,) like a text's projection, or (m, D) like an image's query vectors; each row is
        L2-normalised here).

        The score is exact BLIP-2 ITC: for a text, the best cosine over an image's query vectors (what
        `Blip2.similarity` computes); for an image (or an (m, D) embedding), the mean over the query's
        vectors of their best cosine with the image's (an identical image scores highest). Computed in
        float32 from the stored float16 vectors. Ties go to the earlier added image.

        `rerank` (text only): the top `rerank_k` (at least `k`) are scored by the ITM head, their images read
        again, and ordered by that probability (`Hit.match`); an image that cannot be read is reported in
        `Hit.error` and put after the others. `where`: only rows whose caption / path match (see `Where`).
        An empty index returns []."""
        _check_count("k", k)
        _check_count("rerank_k", rerank_k)
        given = [
            name
            for name, value in (("text", text), ("image", image), ("embedding", embedding))
            if value is not None
        ]
        if len(given) != 1:
            raise InputError(f"search takes one of text, image or embedding; got {given or 'none'}")
        if rerank and text is None:
            raise InputError("rerank needs a text query (the ITM head reads an image with a text)")
        store = self._store()
        meta = store.meta()
        slots = store.live_slots(where)
        if not len(slots) or meta.dim is None:
            return []
        query = self._query(meta, text, image, embedding)  # (m, D) float32, unit rows
        wanted = max(k, rerank_k) if rerank else k
        ann = self._ann_for(store, meta, len(slots))
        found, scores = ranked(store.vectors(), slots, query, wanted, ann)
        if ann is not None and len(found) < min(wanted, len(slots)):
            # a narrow `where` leaves too few of the ANN's candidates: rank the filtered rows exactly
            found, scores = ranked(store.vectors(), slots, query, wanted, None)
        hits = [
            _hit(rank, row, score)
            for rank, (row, score) in enumerate(zip(store.rows_for_slots(found.tolist()), scores.tolist()), 1)
        ]
        if rerank:
            assert text is not None
            hits = self._rerank(hits, text)
        return hits[:k]

    def _query(self, meta: Meta, text, image, embedding) -> np.ndarray:
        """The query as unit vectors (m, D), float32."""
        if embedding is not None:
            vectors = np.asarray(embedding, dtype=np.float32)
            if vectors.ndim == 1:
                vectors = vectors[None]
            if vectors.ndim != 2 or vectors.shape[1] != meta.dim or not len(vectors):
                raise InputError(
                    f"embedding: expected shape ({meta.dim},) or (m, {meta.dim}), got {np.shape(embedding)}"
                )
            return _unit_rows(vectors, "embedding")
        model = self._require_model("search by text or image")
        self._check_model(meta)
        if text is not None:
            return model.embed_texts([text])["text_embeds_proj"].numpy()  # (1, D)
        return model.embed_images([image])["image_embeds_proj"][0].numpy()  # (Q, D)

    def _check_model(self, meta: Meta) -> None:
        config = self.model.config
        if (meta.num_query, meta.dim) != (config.num_query_tokens, config.image_text_hidden_size):
            raise IndexMismatchError(
                f"{self.path}: the index holds {meta.num_query}x{meta.dim} vectors, {self.model.name} makes "
                f"{config.num_query_tokens}x{config.image_text_hidden_size}"
            )
        if meta.fingerprint and meta.fingerprint != self.fingerprint:
            raise IndexMismatchError(
                f"{self.path}: the index was made with another checkpoint ({meta.model or 'unnamed'}) than "
                f"{self.model.name}: its scores would be meaningless; search it with that checkpoint"
            )

    def _rerank(self, hits: list[Hit], text: str) -> list[Hit]:
        """Score the hits by ITM, their images decoded again, a batch at a time; order by that."""
        from ..images import load_resized
        from ..tasks.batch import DECODE_WORKERS, each_input

        model = self.model
        results = each_input(
            hits,
            model.batch_size,
            lambda hit: load_resized(locating.read_row(_row_of(hit)), model.image_config),
            lambda good: model.match(good, text),
            workers=DECODE_WORKERS,
        )
        scored = []
        for hit, (_, result) in zip(hits, results):
            if isinstance(result, Blip2Error):
                scored.append(
                    replace(hit, error=result.reason if isinstance(result, ImageError) else str(result))
                )
            else:
                scored.append(replace(hit, match=float(result)))
        # Matched first by probability (ties: ITC order), the unreadable after them in ITC order.
        scored.sort(key=lambda h: (h.match is None, -(h.match or 0.0)))
        return [replace(hit, rank=rank) for rank, hit in enumerate(scored, 1)]

    def _ann_for(self, store: Store, meta: Meta, candidates: int) -> AnnIndex | None:
        """The ANN stage for a search over `candidates` live rows: none below the brute-force threshold (or
        when it is missing or unusable: searched exactly, the next add rebuilds it); loaded once and kept
        while its files are unchanged."""
        if candidates < BRUTE_FORCE_BELOW or meta.num_query is None or meta.dim is None:
            return None
        identity = _files_identity(store.path, ANN_FILES)
        if self._ann is None or self._ann[0] != identity:
            self._ann = (identity, AnnIndex.load(store.path, meta.num_query, meta.dim, n_slots=meta.slots))
        return self._ann[1]

    # -- about ----------------------------------------------------------------------------------------------
    def meta(self) -> Meta:
        """The index's metadata (count, dims, model name, fingerprint, times); an IndexFileError when `path`
        is not an index."""
        return self._store().meta()

    def info(self) -> dict[str, Any]:
        """What the index holds: count, model, fingerprint, dims, size on disk, creation and last update
        (Unix times), and whether the ANN stage is there and how many slots it covers."""
        store = self._store()
        meta = store.meta()
        ann = self._ann_for(store, meta, max(meta.count, BRUTE_FORCE_BELOW))
        return {
            "path": str(self.path),
            **asdict(meta),
            "size_bytes": store.disk_bytes(),
            "ann": {"present": ann is not None, "covered": ann.covered if ann is not None else 0},
        }

    # -- plumbing -------------------------------------------------------------------------------------------
    def _store(self) -> Store:
        """The reader, opened at first use and kept (searches take no lock), moved to the latest committed
        state at each use (cheap when nothing changed)."""
        if self._reader is None:
            self._reader = open_store(self.path, resident=self.resident)
            return self._reader
        try:
            self._reader.refresh()
        except BaseException:
            self._reader = None  # the store closed itself: the next use opens it again
            raise
        return self._reader

    def _writer(self) -> Store:
        return open_store(self.path, writable=True, lock_timeout=self.lock_timeout)

    def _require_model(self, task: str):
        if self.model is None:
            raise InputError(f"{self.path}: a model is needed to {task}: Index(path, model=blip2.load(...))")
        return self.model


def _hit(rank: int, row: Row, score: float) -> Hit:
    facts = (
        row.hash,
        row.size,
        row.mtime,
        row.width,
        row.height,
        row.caption,
        row.source,
        row.key,
        row.locator,
    )
    return Hit(rank, row.path, score, None, None, *facts)


def _row_of(hit: Hit) -> Row:
    """The stored row a hit was made from (its slot aside), to read its image again (`locating.read_row`)."""
    facts = (
        hit.hash,
        hit.size,
        hit.mtime,
        hit.width,
        hit.height,
        hit.caption,
        hit.source,
        hit.key,
        hit.locator,
    )
    return Row(hit.image, *facts, slot=-1, added=0.0)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _unit_rows(vectors: np.ndarray, what: str) -> np.ndarray:
    """Rows scaled to unit length; an InputError for a non-finite or zero row."""
    if not np.isfinite(vectors).all():
        raise InputError(f"{what}: holds NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    if (norms == 0).any():
        raise InputError(f"{what}: a vector of zeros has no direction")
    return (vectors / norms).astype(np.float32)


def _as_vectors(embeddings: np.ndarray, count: int) -> np.ndarray:
    """`add_embeddings`' input as unit (N, Q, D) float32 rows, checked."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    if vectors.ndim != 3 or not vectors.size:
        raise InputError(
            f"embeddings: expected (N, Q, D) projected query embeddings, got shape {vectors.shape}"
        )
    if len(vectors) != count:
        raise InputError(f"{count} keys for {len(vectors)} embeddings")
    return _unit_rows(vectors, "embeddings")


def _embedding_row(key: str, vectors: np.ndarray, digest: str | None) -> NewRow:  # vectors (Q, D) float16
    """The row of a vector made elsewhere: its hash is the image's `digest` when known, else that of the
    vectors (so it never passes for a copy of a file), its size and mtime those of the file when the key
    names one here."""
    digest = digest or "embedding:" + hashlib.sha256(vectors.tobytes()).hexdigest()
    if os.path.isfile(key):
        info = os.stat(key)
        return NewRow(os.path.abspath(key), digest, info.st_size, info.st_mtime, 0, 0)
    return NewRow(key, digest, 0, 0.0, 0, 0)


def _files_identity(folder: Path, names: Sequence[str]) -> tuple:
    """(size, mtime_ns) of each file, None when missing: changes when a writer replaces them."""
    identity: list[tuple[int, int, int] | None] = []
    for name in names:
        try:
            info = os.stat(folder / name)
            identity.append((info.st_size, info.st_mtime_ns, info.st_ino))
        except OSError:
            identity.append(None)
    return tuple(identity)
