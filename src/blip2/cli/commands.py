"""The commands: arguments in, the task API called (through the batch iterator for images), records out."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import click

from ..embeddings_io import path_fields
from ..errors import Blip2Error
from .job_commands import JobArgs, refuse_job_options
from .options import TEXT, generation_options, job_options, match_options, model_options
from .output import cell, emit, json_line, message
from .serve_command import serve

if TYPE_CHECKING:  # the library is imported when a command runs, so that --help stays fast
    from ..generation import GenerationOptions

PROGRESS_THRESHOLD = 8  # show a progress bar from this many images on

Result = TypeVar("Result")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blip2")
def cli():
    """BLIP-2 from the command line: caption images, answer questions about them, match them with texts,
    embed them, and label them zero-shot.

    \b
    Exit codes:
      0    every input was processed
      1    some inputs failed (an image could not be read), the checkpoint is unusable,
           the output file could not be written (e.g. a full disk), or the reader of the
           output went away (e.g. piped into head: blip2 stops quietly)
      2    usage error: a bad option, argument or input value
      3    internal error: a bug in blip2 (BLIP2_DEBUG=1 shows the traceback)
      130  interrupted (Ctrl-C)
    """


cli.add_command(serve)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--prompt", "-p", type=TEXT, default=None, help="Text the caption continues (e.g. 'a photo of')."
)
@job_options
@model_options
@generation_options
def caption(
    images,
    prompt,
    out,
    overwrite,
    chunk_size,
    column,
    keep,
    workers,
    engine,
    actors,
    model,
    device,
    dtype,
    quantize,
    batch_size,
    as_json,
    **generation,
):
    """Caption IMAGES (files). Defaults: 5 beams, at most 30 new tokens; InstructBLIP checkpoints are asked
    "A short image caption:" unless --prompt is given (as `model.caption` does).

    With --out, a resumable job: IMAGES may be folders (recursive), globs, @lists, WebDataset tar shards
    ("shards/{00000..00099}.tar") or .parquet/.csv tables, and running the same command again finishes
    what a killed run left."""
    options = _task_options("caption", generation)
    if out is not None:
        from .job_commands import caption_job

        load = partial(_load, model, device, dtype, quantize, batch_size)
        args = JobArgs(out, overwrite, chunk_size, column, keep, workers, engine, actors)
        caption_job(load, images, args, model, prompt, options)
    pipe = _load(model, device, dtype, quantize, batch_size)

    failed = False
    for path, result in _each_image(
        pipe, images, lambda good: pipe.caption(good, prompt, generation=options)
    ):
        failed |= emit(path, result, as_json, lambda text: {"caption": text}, len(images) > 1)
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("image")
@click.argument("questions", nargs=-1, type=TEXT)
@click.option(
    "--question", "-q", "asked", multiple=True, type=TEXT, help="With --out: a question (repeatable)."
)
@click.option("--template", type=TEXT, default=None, help="Prompt template with {} for the question.")
@job_options
@model_options
@generation_options
def ask(
    image,
    questions,
    asked,
    template,
    out,
    overwrite,
    chunk_size,
    column,
    keep,
    workers,
    engine,
    actors,
    model,
    device,
    dtype,
    quantize,
    batch_size,
    as_json,
    **generation,
):
    """Answer QUESTIONS about IMAGE, --batch-size questions per pass (the image is decoded once). Defaults:
    5 beams, at most 10 new tokens, length penalty -1.

    With --out, a resumable job over IMAGE QUESTIONS... taken as images (folders, globs, @lists) and asked
    each --question: blip2 ask photos/ --question "how many people?" --out answers.jsonl"""
    if out is not None:
        images, questions = (image, *questions), asked
    hint = "--question" if out is not None else "QUESTIONS"
    if not questions:
        raise click.BadParameter("no question given", param_hint=hint)
    for q in questions:
        if not q.strip():
            raise click.BadParameter("a question is empty", param_hint=hint)
    options = _task_options("ask", generation)
    if out is not None:
        from .job_commands import ask_job

        load = partial(_load, model, device, dtype, quantize, batch_size)
        args = JobArgs(out, overwrite, chunk_size, column, keep, workers, engine, actors)
        ask_job(load, images, args, model, questions, template, options)
    pipe = _load(model, device, dtype, quantize, batch_size)
    answers = _one_image(
        pipe, image, as_json, lambda decoded: pipe.ask(decoded, list(questions), template, generation=options)
    )
    if as_json:
        rows = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
        click.echo(json_line({**path_fields(image), "answers": rows}))
    else:
        for q, a in zip(questions, answers):
            click.echo(f"{cell(q)}\t{cell(a)}" if len(questions) > 1 else cell(a))
    sys.exit(0)


@cli.command()
@click.argument("image")
@click.argument("texts", nargs=-1, required=True, type=TEXT)
@match_options
def match(image, texts, model, device, dtype, quantize, batch_size, as_json):
    """ITM: the probability that IMAGE matches each of TEXTS."""
    pipe = _load(model, device, dtype, quantize, batch_size)
    probs = _one_image(pipe, image, as_json, lambda decoded: pipe.match(decoded, list(texts)))
    if as_json:
        rows = [{"text": t, "probability": p} for t, p in zip(texts, probs)]
        click.echo(json_line({**path_fields(image), "matches": rows}))
    else:
        for t, p in zip(texts, probs):
            click.echo(f"{p:.4f}\t{cell(t)}")
    sys.exit(0)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--text",
    "-t",
    "texts",
    multiple=True,
    required=True,
    type=TEXT,
    help="A text to compare with (repeatable).",
)
@match_options
def similarity(images, texts, model, device, dtype, quantize, batch_size, as_json):
    """ITC: the similarity of each of IMAGES with each --text (best cosine over the query tokens)."""
    pipe = _load(model, device, dtype, quantize, batch_size)
    failed = False
    if not as_json:
        click.echo("\t".join(cell(t) for t in ("image", *texts)))
    for path, result in _each_image(pipe, images, lambda good: pipe.similarity(good, list(texts)).tolist()):
        if isinstance(result, Exception):
            failed |= emit(path, result, as_json, None, False)
        elif as_json:
            rows = [{"text": t, "score": s} for t, s in zip(texts, result)]
            click.echo(json_line({**path_fields(path), "scores": rows}))
        else:
            click.echo("\t".join([cell(path), *(f"{s:.4f}" for s in result)]))
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@job_options
@match_options
def embed(
    images,
    out,
    overwrite,
    chunk_size,
    column,
    keep,
    workers,
    engine,
    actors,
    model,
    device,
    dtype,
    quantize,
    batch_size,
    as_json,
):
    """Embed IMAGES for search into --out: the projected, normalised query embeddings (32, 256) of each image
    (retrieval checkpoints), which `blip2 index add-embeddings` reads.

    \b
    --out FILE.parquet (a folder of parts) or FILE.jsonl: a resumable job, one row per input (folders,
    globs, @lists, tar shards, .parquet/.csv tables) with its `image_embeds_proj` or its `error`; the same
    command again finishes what a killed run left.
    --out FILE.npy: one float32 array (N, 32, 256) of the image files that could be read, their names in
    FILE.npy.paths.jsonl (the Q-Former outputs (N, 32, 768) for checkpoints without projection); rows are
    written as they are computed, and an interrupted run keeps the rows printed with --json."""
    if out is None:
        raise click.BadParameter("an output file is needed (.parquet, .jsonl or .npy)", param_hint="--out")
    args = JobArgs(out, overwrite, chunk_size, column, keep, workers, engine, actors)
    if out.lower().endswith((".parquet", ".jsonl")):
        from .job_commands import embed_job

        load = partial(_load, model, device, dtype, quantize, batch_size)
        embed_job(load, images, args, model)
    refuse_job_options(args, "with an .npy output (not a job)")
    _embed_to_file(images, out, model, device, dtype, quantize, batch_size, as_json)


def _embed_to_file(images, out, model, device, dtype, quantize, batch_size, as_json):
    """`blip2 embed IMAGES --out FILE.npy`: the array file, written row by row (`blip2.embeddings_io`)."""
    from ..embeddings_io import open_writer

    writer = open_writer(out)  # an unusable destination fails here, before the model is loaded
    try:
        pipe = _load(model, device, dtype, quantize, batch_size)
    except BaseException:
        writer.discard()
        raise
    failed = False
    try:
        for path, result in _each_image(pipe, images, lambda good: _embeddings(pipe, good)):
            if isinstance(result, Exception):
                failed |= emit(path, result, as_json, None, False)
                continue
            row = writer.append(path, result)
            if as_json:
                click.echo(json_line({**path_fields(path), "row": row, "out": out}))
    except BaseException:
        _close(writer, out, stopped=True)
        raise
    _close(writer, out, stopped=False)
    sys.exit(1 if failed else 0)


def _embeddings(pipe, images: list) -> list:
    """One embedding per image: the ITC projections where the checkpoint has them, else the query outputs."""
    result = pipe.embed_images(images)
    return list(result.get("image_embeds_proj", result["image_embeds"]).numpy())


def _close(writer, out: str, stopped: bool) -> None:
    """Move the embeddings file into place and say what it holds."""
    shape = writer.close()
    where = message(out)
    early = "stopped early: " if stopped else ""
    if shape is None:
        click.echo(f"blip2: {early}no embeddings written to {where}", err=True)
    else:
        click.echo(f"blip2: {early}wrote {shape[0]} embeddings of shape {shape[1:]} to {where}", err=True)


@cli.command()
@click.argument("image")
@click.argument("more_images", nargs=-1, metavar="[IMAGES]...")
@click.option("--labels", "-l", required=True, type=TEXT, help="Comma-separated labels, e.g. 'cat,dog,car'.")
@click.option(
    "--template", type=TEXT, default="a photo of {}", show_default=True, help="Prompt with {} for the label."
)
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep the k best labels.")
@click.option("--rerank", is_flag=True, help="Re-rank the candidates by ITM (image and text read together).")
@job_options
@match_options
def classify(
    image,
    more_images,
    labels,
    template,
    top_k,
    rerank,
    out,
    overwrite,
    chunk_size,
    column,
    keep,
    workers,
    engine,
    actors,
    model,
    device,
    dtype,
    quantize,
    batch_size,
    as_json,
):
    """Zero-shot classification of IMAGE among --labels (ITC; probabilities: softmax of similarity / 0.07).

    With --out, a resumable job over IMAGE IMAGES... (folders, globs, @lists), one row per image."""
    names = [label.strip() for label in labels.split(",") if label.strip()]
    if not names:
        raise click.BadParameter("no labels given", param_hint="--labels")
    if out is not None:
        from .job_commands import classify_job

        load = partial(_load, model, device, dtype, quantize, batch_size)
        args = JobArgs(out, overwrite, chunk_size, column, keep, workers, engine, actors)
        classify_job(load, (image, *more_images), args, model, names, template, top_k, rerank)
    if more_images:
        raise click.BadParameter("one image, or give --out to classify many", param_hint="IMAGES")
    pipe = _load(model, device, dtype, quantize, batch_size)
    ranked = _one_image(
        pipe,
        image,
        as_json,
        lambda decoded: pipe.classify(decoded, names, template=template, top_k=top_k, rerank=rerank),
    )
    if as_json:
        click.echo(json_line({**path_fields(image), "labels": ranked}))
    else:
        for row in ranked:
            extra = f"\tmatch {row['match']:.4f}" if "match" in row else ""
            click.echo(f"{cell(row['label'])}\t{row['probability']:.4f}\t(score {row['score']:.4f}){extra}")
    sys.exit(0)


def _task_options(task: str, generation: dict) -> GenerationOptions:
    """The options given on the command line, with the task's defaults, as one `GenerationOptions`
    checked before the model loads and passed to the task as is."""
    from ..tasks.captioning import options_for_task

    return options_for_task(task, {k: v for k, v in generation.items() if v is not None})


def _load(model: str, device: str | None, dtype: str | None, quantize: str | None, batch_size: int):
    from ..tasks.api import load

    pipe = load(model, device=device, dtype=dtype, quantize=quantize)
    pipe.batch_size = batch_size  # caption / ask: (image, prompt) pairs per forward pass
    return pipe


def _each_image(
    pipe, paths: Sequence[str], run: Callable[[list], Sequence[Result]]
) -> Iterator[tuple[str, Result | Blip2Error]]:
    """Yield (path, result or ImageError) in input order, through the task layer's batch iterator (see
    `blip2.tasks.batch`), with a progress bar on a terminal. `run` takes the decoded images of a batch."""
    from tqdm import tqdm

    from ..tasks.batch import each_image

    # A progress bar only on a terminal: in a log it would break the one-line-per-error output.
    show = len(paths) >= PROGRESS_THRESHOLD and sys.stderr.isatty()
    with tqdm(
        each_image(pipe, paths, run), total=len(paths), unit="img", file=sys.stderr, disable=not show
    ) as bar:
        yield from bar


def _one_image(pipe, path: str, as_json: bool, run: Callable):
    """`run` over one decoded image; an image that cannot be read is reported and ends the command (exit 1)."""
    [(_, result)] = _each_image(pipe, [path], lambda good: [run(good[0])])
    if isinstance(result, Blip2Error):
        sys.exit(emit(path, result, as_json, None, False))
    return result


@cli.command("convert-lavis")
@click.argument("checkpoint")
@click.option(
    "--base", required=True, help="The released checkpoint it was fine-tuned from (directory or Hub id)."
)
@click.option("--out", "-o", required=True, help="The directory to write (Hugging Face layout).")
@click.option("--force", is_flag=True, help="Replace --out if it already holds a checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON on stdout.")
def convert_lavis_command(checkpoint, base, out, force, as_json):
    """Convert CHECKPOINT, a .pth saved by Salesforce LAVIS, into a directory that blip2 loads.

    The .pth holds what the fine-tuning trained (Q-Former, query tokens, ln_vision, language projection); the
    rest comes from --base, the released checkpoint it was fine-tuned from. Example:

    \b
        blip2 convert-lavis checkpoint_best.pth --base Salesforce/blip2-opt-2.7b --out my-blip2
    """
    from pathlib import Path

    from ..loading.lavis import convert_lavis

    report = convert_lavis(Path(checkpoint), base, Path(out), force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    click.echo(report.summary(), err=True)
    if report.dropped:
        click.echo(report.dropped_note(), err=True)
    sys.exit(0)


def _register_index_commands() -> None:
    from .index_commands import index_group, search_command

    cli.add_command(index_group)
    cli.add_command(search_command)


_register_index_commands()
