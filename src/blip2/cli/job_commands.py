"""The commands as jobs: `--out FILE` runs the task over every input through `blip2.jobs`, resumable, and
ends with a summary on stderr instead of a line per image on stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict

import click

from .output import message


def caption_job(
    load: Callable, images, out: str, model: str, prompt: str | None, options, overwrite, chunk_size
):
    """`blip2 caption IMAGES --out FILE`: one row per input with its caption."""
    from ..jobs import Job

    job = Job("caption", model, {"prompt": prompt, **asdict(options)}, {"caption": "string"})

    def captions(pipe, good: list) -> list[dict]:
        return [{"caption": text} for text in pipe.caption(good, prompt, generation=options)]

    _run(load, images, out, job, overwrite, chunk_size, captions)


def ask_job(
    load: Callable, images, out: str, model: str, questions, template, options, overwrite, chunk_size
):
    """`blip2 ask IMAGES --question Q... --out FILE`: one row per input with its `answers` (a list of
    {question, answer}, in the order of the questions)."""
    from ..jobs import Job

    job = Job(
        "ask",
        model,
        {"questions": list(questions), "template": template, **asdict(options)},
        {"answers": "list<question:string,answer:string>"},
    )

    def answers(pipe, good: list) -> list[dict]:
        return [
            {"answers": [{"question": q, "answer": a} for q, a in zip(questions, asked)]}
            for asked in (pipe.ask(image, list(questions), template, generation=options) for image in good)
        ]

    _run(load, images, out, job, overwrite, chunk_size, answers)


def classify_job(
    load: Callable, images, out: str, model: str, labels, template, top_k, rerank, overwrite, chunk_size
):
    """`blip2 classify IMAGES --labels L --out FILE`: one row per input with its ranked `labels` (a list of
    {label, score, probability, match}; match is null without --rerank)."""
    from ..jobs import Job

    options = {"labels": list(labels), "template": template, "top_k": top_k, "rerank": rerank}
    job = Job(
        "classify",
        model,
        options,
        {"labels": "list<label:string,score:double,probability:double,match:double>"},
    )

    def ranked(pipe, good: list) -> list[dict]:
        return [
            {"labels": pipe.classify(image, list(labels), template=template, top_k=top_k, rerank=rerank)}
            for image in good
        ]

    _run(load, images, out, job, overwrite, chunk_size, ranked)


def _run(load: Callable, images, out: str, job, overwrite: bool, chunk_size: int | None, run: Callable):
    """Run `job` over `images` into `out`, `run(pipe, decoded images)` giving each image's result columns;
    exit 1 when some input failed in this run. The output is checked (another job's? damaged?) before
    `load()` loads the model."""
    from ..images import load_resized
    from ..jobs import CHUNK_SIZE, open_job, run_job

    output = open_job(out, job, overwrite)
    pipe = load()
    summary = run_job(
        images,
        output,
        job,
        lambda path: load_resized(path, pipe.image_config),
        lambda good: run(pipe, good),
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
