"""The local job runner: a task over many image files, in batches through the task layer's error-isolating
iterator (`blip2.tasks.batch.each_input`, decoding ahead in threads), its rows committed a chunk at a time
(see `outputs`). Running the same job again skips the inputs already done, keyed by source path and content
sha256 (the options are the job's, checked against the manifest), and finishes the rest.

One row per input: `source`, `index` (its place in this run's input list), `sha256` (null when the file
could not be read), the task's result columns, `model`, `options` (JSON) and `error` (the reason an input
failed, null when it did not). An input that failed is done too: running again does not retry it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import Blip2Error
from ..sources import find_images
from .decode import Decoder
from .outputs import JobError, Output, open_output

__all__ = ["Job", "JobError", "Summary", "open_job", "run_job"]

CHUNK_SIZE = 256  # rows per committed chunk: what a kill may cost, against one file per chunk


@dataclass(frozen=True)
class Job:
    """What a job computes: the task, the model as named by the user, the task's options (JSON-able), and
    the task's result columns (name -> pyarrow type name, e.g. {"caption": "string"})."""

    task: str
    model: str
    options: dict[str, Any]
    columns: dict[str, str]

    def identity(self) -> dict[str, Any]:
        """What must match for a job's output to be continued by this job."""
        return {"task": self.task, "model": self.model, "options": self.options}


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


def open_job(out: str, job: Job, overwrite: bool = False) -> Output:
    """The output of `job` at `out`, created or reopened to be continued (a JobError when it belongs to
    another job, unless `overwrite`): done before the model is loaded, so that a mistake costs nothing."""
    return open_output(out, job.identity(), job.columns, overwrite)


def run_job(
    inputs: Iterable[str],
    output: Output,
    job: Job,
    prepare: Callable[[str], object],
    run: Callable[[list], Sequence[dict[str, Any]]],
    *,
    batch_size: int,
    chunk_size: int = CHUNK_SIZE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Run `job` over the image files `inputs` expands to (folders, globs, @lists: `blip2.sources`), writing
    its rows to `output` (from `open_job`). `prepare` decodes one file (an ImageError fails that
    input alone), `run` takes a batch of prepared inputs and returns one dict of result columns each.
    `workers`: see `decode.Decoder` (None: threads; 0: none; N: processes, then `prepare` must be picklable).
    `progress(handled, total)` is called after each committed chunk (a progress bar)."""
    start = time.monotonic()
    found = find_images(inputs)
    done = set(output.keys())
    options = json.dumps(job.options, sort_keys=True, ensure_ascii=False)
    base = {"model": job.model, "options": options, "error": None} | dict.fromkeys(job.columns)
    summary = Summary()

    # Inputs `find_images` passed over (not an image, unreadable, no such file) are error rows, after the
    # images, so every input the user named is accounted for.
    pending: list[tuple[int, str]] = list(enumerate(found.files))
    offset = len(found.files)
    skipped = [(offset + i, s.path, s.reason) for i, s in enumerate(found.skipped)]
    with Decoder(prepare, workers, batch_size) as decoder:
        for start_row in range(0, len(pending), chunk_size):
            chunk = pending[start_row : start_row + chunk_size]
            rows = _chunk_rows(chunk, done, base, decoder, run, summary)
            if rows:
                output.append(rows)
            if progress:
                progress(start_row + len(chunk), len(pending))
    failed_rows = [
        base | {"source": path, "index": index, "sha256": None, "error": reason}
        for index, path, reason in skipped
        if (path, None) not in done
    ]
    summary.skipped += len(skipped) - len(failed_rows)
    if failed_rows:
        output.append(failed_rows)
        summary.failed += len(failed_rows)
        summary.errors += [f"{row['source']}: {row['error']}" for row in failed_rows]
    summary.seconds = time.monotonic() - start
    return summary


def _chunk_rows(
    chunk: list[tuple[int, str]],
    done: set[tuple[str, str | None]],
    base: dict[str, Any],
    decoder: Decoder,
    run: Callable[[list], Sequence[dict[str, Any]]],
    summary: Summary,
) -> list[dict[str, Any]]:
    """The rows of the inputs of `chunk` not yet done: hashed, then run in batches."""
    todo = []
    for index, path in chunk:
        digest = file_sha256(path)
        if (path, digest) in done:
            summary.skipped += 1
        else:
            todo.append((index, path, digest))
    rows = []
    results = decoder.each([path for _, path, _ in todo], run)
    for (index, path, digest), (_, result) in zip(todo, results):
        row = base | {"source": path, "index": index, "sha256": digest}
        if isinstance(result, Blip2Error):
            row["error"] = getattr(result, "reason", str(result))
            summary.failed += 1
            summary.errors.append(str(result))
        else:
            row |= result
            summary.done += 1
        rows.append(row)
    return rows


def file_sha256(path: str) -> str | None:
    """The hex sha256 of the file's content, or None when it cannot be read (its row will say why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
