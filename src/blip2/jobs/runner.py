"""The local job runner: a task over a job's inputs (`blip2.jobs.inputs`: image files, tar shards, tables),
in batches through the task layer's error-isolating iterator (`blip2.tasks.batch.each_input`), decoding
ahead in threads or worker processes (`decode`), its rows committed a chunk at a time (see `outputs`). Each
input is read once: its bytes are hashed, then decoded from memory. Running the same job again skips the
inputs already done, keyed by (source, key, content sha256) (the options are the job's, checked against the
manifest), and finishes the rest.

One row per input: `source`, `index` (its place in this run's input list), `key` (the image within the
source: the path itself for image files, the sample key in a tar shard, the row's key in a table), `sha256`
(null when the input could not be read), the kept columns (`extra`: a shard's `txt` and `json`, a table's
--keep columns), the task's result columns, `model`, `options` (JSON) and `error` (the reason an input
failed, null when it did not). An input that failed is done too: running again does not retry it.

`commit_job` is what every engine shares: inputs expanded, done rows skipped, chunks of rows committed,
failed inputs' rows. `rows_for` turns prepared items into rows; the local engine (`run_job`) calls it a
chunk at a time, the Ray engine (`ray_engine`) in each model actor on its share of the items.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..embeddings_io import valid_text
from ..errors import Blip2Error, ImageError
from .decode import Decoder
from .inputs import Failed, Item, expand_inputs, input_name
from .outputs import JobError, Output, open_output

__all__ = [
    "Job",
    "JobError",
    "Summary",
    "base_row",
    "commit_job",
    "failed_row",
    "open_job",
    "rows_for",
    "run_job",
]

CHUNK_SIZE = 256  # rows per committed chunk: what a kill may cost, against one file per chunk

Prepare = Callable[[bytes], object]  # an image's bytes -> what `Run` takes (a decoded, resized image)
Run = Callable[[list], Sequence[dict[str, Any]]]  # prepared inputs -> one dict of result columns each
DoneKey = tuple[str, str, str | None]  # (source, key, sha256) of an input done
PrepareItem = Callable[[Item], tuple[str, object]]  # an item -> (sha256, prepared), see `commit_job`
Chunk = tuple[list[dict[str, Any]], "Summary"]  # the rows of some items, and their counts


class Decoding(Protocol):
    """Where items are prepared (`decode.Decoder`, or Ray's decode tasks): `each(items, run)` gives (item,
    result of `run` on its prepared form, or the Blip2Error that stopped it) in item order."""

    def each(
        self, items: Sequence[Item], run: Callable[[list], Sequence[Any]]
    ) -> Iterator[tuple[Item, Any]]: ...


@dataclass(frozen=True)
class Job:
    """What a job computes: the task, the model as named by the user, the task's options (JSON-able), the
    task's result columns (name -> pyarrow type name, e.g. {"caption": "string"}), and the input columns
    kept in each row (`extra`, text: a shard's txt and json, a table's --keep columns)."""

    task: str
    model: str
    options: dict[str, Any]
    columns: dict[str, str]
    extra: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What must match for a job's output to be continued by this job."""
        return {"task": self.task, "model": self.model, "options": self.options, "extra": list(self.extra)}

    def output_columns(self) -> dict[str, str]:
        """The columns between the input's own (source, index, key, sha256) and model/options/error."""
        return dict.fromkeys(self.extra, "string") | self.columns


@dataclass
class Summary:
    """How a run went: inputs done now, skipped (done by an earlier run), failed now, and seconds taken."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.done} done, {self.skipped} skipped (done before), {self.failed} failed "
            f"in {self.seconds:.1f} s"
        )

    def add(self, other: Summary) -> None:
        """Count `other` (a batch's) in."""
        self.done += other.done
        self.skipped += other.skipped
        self.failed += other.failed
        self.errors += other.errors


def open_job(out: str, job: Job, overwrite: bool = False) -> Output:
    """The output of `job` at `out`, created or reopened to be continued (a JobError when it belongs to
    another job, unless `overwrite`): done before the model is loaded, so that a mistake costs nothing."""
    return open_output(out, job.identity(), job.output_columns(), overwrite)


def run_job(
    inputs: Sequence[str] | Sequence[Item | Failed],
    output: Output,
    job: Job,
    prepare: Prepare,
    run: Run,
    *,
    batch_size: int,
    chunk_size: int = CHUNK_SIZE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Run `job` over `inputs` (what `expand_inputs` gave, or the names to give it), writing its rows to
    `output` (from `open_job`). `prepare` decodes one image's bytes (an ImageError fails that input alone),
    `run` takes a batch of prepared inputs and returns one dict of result columns each. `workers` says where
    the inputs are read and decoded ahead of the model (`decode.Decoder`: None in threads, 0 in turn, N in
    N processes, then `prepare` must be picklable). `progress(handled, total)` is called after each
    committed chunk (a progress bar)."""

    def chunks(items: list[Item], prepare_item: PrepareItem, base: dict[str, Any]) -> Iterator[Chunk]:
        with Decoder(prepare_item, workers, batch_size, _lost) as decoder:
            for first in range(0, len(items), chunk_size):
                yield rows_for(items[first : first + chunk_size], decoder, run, base)

    return commit_job(inputs, output, job, prepare, chunks, progress)


def commit_job(
    inputs: Sequence[str] | Sequence[Item | Failed],
    output: Output,
    job: Job,
    prepare: Prepare,
    chunks: Callable[[list[Item], PrepareItem, dict[str, Any]], Iterable[Chunk]],
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """What every engine shares (see `run_job`, and `ray_engine`): the inputs expanded, the rows done read
    back, and each (rows, counts) that `chunks(items, prepare_item, base_row(job))` yields, in item order,
    committed to `output`; then the failed inputs' rows. `prepare_item` (picklable when `prepare` is) reads
    an item, hashes it, skips it when done, and decodes it with `prepare`: `rows_for` turns its results
    into rows."""
    start = time.monotonic()
    names = [x for x in inputs if isinstance(x, str)]
    expanded = [*expand_inputs(names)] if names else [x for x in inputs if not isinstance(x, str)]
    items = [x for x in expanded if isinstance(x, Item)]
    done = set(output.keys())
    base = base_row(job)
    summary = Summary()
    handled = 0
    for rows, counts in chunks(items, functools.partial(_prepared, prepare=prepare, done=done), base):
        if rows:
            output.append(rows)
        summary.add(counts)
        handled += len(rows) + counts.skipped  # every item is a row or skipped
        if progress:
            progress(handled, len(items))
    # Inputs that could not become items (not an image, unreadable, no such file, a bad tar member) are
    # error rows, after the items, so every input the user named is accounted for.
    failed = [x for x in expanded if isinstance(x, Failed)]
    failed_rows = [failed_row(x, base) for x in failed if _done_key(x, None) not in done]
    summary.skipped += len(failed) - len(failed_rows)
    if failed_rows:
        output.append(failed_rows)
        summary.failed += len(failed_rows)
        summary.errors += [f"{input_name(row['source'], row['key'])}: {row['error']}" for row in failed_rows]
    summary.seconds = time.monotonic() - start
    return summary


def base_row(job: Job) -> dict[str, Any]:
    """The columns every row of `job` has before its input's: the model and options, the rest null."""
    options = json.dumps(job.options, sort_keys=True, ensure_ascii=False)
    return dict.fromkeys(job.output_columns()) | {"model": job.model, "options": options, "error": None}


def failed_row(failed: Failed, base: dict[str, Any]) -> dict[str, Any]:
    """The error row of an input that could not become an item."""
    input_columns = {"index": failed.index, "sha256": None} | _names(failed.source, failed.key)
    return base | input_columns | {"error": failed.reason}


def rows_for(items: Sequence[Item], decoder: Decoding, run: Run, base: dict[str, Any]) -> Chunk:
    """The rows of `items` not done before (`base_row` completed with each input's columns and result or
    error) in item order, and their counts. `decoder.each` gives each item's `prepare_item` result (see
    `commit_job`: each item read once, hashed, decoded only when not done) and `run`'s result on it."""
    summary = Summary()
    rows = []
    results = decoder.each(items, _run_with(run))
    for item, result in results:
        if isinstance(result, Blip2Error):
            digest, error = (result.digest, result.error) if isinstance(result, _NotRun) else (None, result)
            if error is None:
                summary.skipped += 1
                continue
        row = base | {"index": item.index} | _names(item.source, item.key)
        row |= {name: item.extra.get(name) for name in item.extra if name in base}
        if isinstance(result, Blip2Error):
            reason = getattr(error, "reason", None) or str(error)
            row |= {"sha256": digest, "error": reason}
            summary.failed += 1
            summary.errors.append(f"{item.name}: {reason}")
        else:
            digest, columns = result
            row |= {"sha256": digest} | columns
            summary.done += 1
        rows.append(row)
    return rows, summary


class _NotRun(Blip2Error):
    """An input that does not go to the model: done by an earlier run (`error` None), or failed (it
    could not be read: `digest` None; or not decoded)."""

    def __init__(self, digest: str | None, error: Blip2Error | None):
        super().__init__(str(error))
        self.digest = digest
        self.error = error


def _prepared(item: Item, prepare: Prepare, done: set[DoneKey]) -> tuple[str, object]:
    """(sha256, decoded image) of one item, read once; _NotRun for one done before or failing."""
    try:
        data = item.read()
    except Blip2Error as e:
        raise _NotRun(None, None if _done_key(item, None) in done else e) from None
    digest = hashlib.sha256(data).hexdigest()
    if _done_key(item, digest) in done:
        raise _NotRun(digest, None)
    try:
        return digest, prepare(data)
    except Blip2Error as e:
        raise _NotRun(digest, e) from None


def _lost(item: Item, reason: str) -> _NotRun:
    """The result of an item whose decoding process died or hung (`decode.DecodePool`): an error row with
    its sha256, so that running again counts it done rather than crashing on it again."""
    try:
        digest: str | None = hashlib.sha256(item.read()).hexdigest()
    except Blip2Error:
        digest = None
    return _NotRun(digest, ImageError(item.name, reason))


def _run_with(run: Run) -> Callable[[list], list[tuple[str, dict[str, Any]]]]:
    """`run` over prepared (sha256, image) pairs, each result paired with its sha256."""

    def run_pairs(prepared: list) -> list[tuple[str, dict[str, Any]]]:
        return list(zip([digest for digest, _ in prepared], run([image for _, image in prepared])))

    return run_pairs


def _names(source: str, key: str) -> dict[str, str]:
    """An input's `source` and `key` columns: as valid UTF-8 text (a file name's undecodable bytes written
    as \\xNN, see `blip2.embeddings_io.valid_text`), which parquet and JSON require."""
    return {"source": valid_text(source), "key": valid_text(key)}


def _done_key(item: Item | Failed, digest: str | None) -> DoneKey:
    """How an input is found among the rows done (written by `_names`)."""
    return valid_text(item.source), valid_text(item.key), digest
