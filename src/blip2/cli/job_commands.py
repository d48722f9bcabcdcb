"""The commands as jobs: `--out FILE` runs the task over every input through `blip2.jobs`, resumable, and
ends with a summary on stderr instead of a line per image on stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict

import click

from .output import message


def caption_job(
    load: Callable,
    images,
    out: str,
    model: str,
    prompt: str | None,
    options,
    overwrite: bool,
    chunk_size: int | None,
):
    """`blip2 caption IMAGES --out FILE`: one row per input with its caption or error; exit 1 when some
    input failed in this run. The output is checked (another job's? damaged?) before `load()` loads the model."""
    from ..images import load_resized
    from ..jobs import CHUNK_SIZE, Job, open_job, run_job

    job = Job("caption", model, {"prompt": prompt, **asdict(options)}, {"caption": "string"})
    output = open_job(out, job, overwrite)
    pipe = load()
    summary = run_job(
        images,
        output,
        job,
        lambda path: load_resized(path, pipe.image_config),
        lambda good: [{"caption": text} for text in pipe.caption(good, prompt, generation=options)],
        batch_size=pipe.batch_size,
        chunk_size=chunk_size or CHUNK_SIZE,
        progress=_progress_bar(),
    )
    for error in summary.errors:
        click.echo(f"blip2: {message(error)}", err=True)
    click.echo(f"blip2: {summary.line()}; rows in {message(out)}", err=True)
    sys.exit(1 if summary.failed else 0)


def _progress_bar() -> Callable[[int, int], None] | None:
    """Images/s and ETA on stderr, on a terminal only (in a log it would break the one-line summaries)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(unit="img", file=sys.stderr, smoothing=0.1)

    def show(handled: int, total: int) -> None:
        bar.total = total
        bar.update(handled - bar.n)
        if handled == total:
            bar.close()

    return show
