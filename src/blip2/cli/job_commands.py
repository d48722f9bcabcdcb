"""The commands as jobs: `--out FILE` runs the task over every input through `blip2.jobs`, resumable, and
ends with a summary on stderr instead of a line per image on stdout."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import click

from .output import message


@dataclass(frozen=True)
class JobArgs:
    """The job options of a command line (see `options.job_options`)."""

    out: str
    overwrite: bool = False
    chunk_size: int | None = None
    column: str | None = None  # a table's image column (default: found by name)
    keep: tuple[str, ...] = ()  # table columns kept in each row
    workers: int | None = None  # decode processes ahead of the model (None: threads; blip2.jobs.decode)
    engine: str = "local"  # or "ray": a Ray Data pipeline (blip2.jobs.ray_engine)
    actors: int | None = None  # with the ray engine: model actors (default: one per GPU, or 1)


def refuse_job_options(args: JobArgs, where: str) -> None:
    """A usage error naming the first job option given (`args` differs from its default) where the command
    does not run as a job (`where`): silently ignoring --workers or --engine ray would mislead."""
    for field in fields(JobArgs):
        if field.name != "out" and getattr(args, field.name) != field.default:
            option = "--" + field.name.replace("_", "-")
            raise click.UsageError(f"{option} is a job option: it has no effect {where}")


def caption_job(load: Callable, images, args: JobArgs, model: str, prompt: str | None, options):
    """`blip2 caption IMAGES --out FILE`: one row per input with its caption."""
    from ..jobs import Job

    job = Job("caption", model, {"prompt": prompt, **asdict(options)}, {"caption": "string"})

    def captions(pipe, good: list) -> list[dict]:
        return [{"caption": text} for text in pipe.caption(good, prompt, generation=options)]

    _run(load, images, args, job, captions)


def ask_job(load: Callable, images, args: JobArgs, model: str, questions, template, options):
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

    _run(load, images, args, job, answers)


def classify_job(load: Callable, images, args: JobArgs, model: str, labels, template, top_k, rerank):
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

    _run(load, images, args, job, ranked)


def embed_job(load: Callable, images, args: JobArgs, model: str):
    """`blip2 embed IMAGES --out FILE`: one row per input with its `image_embeds_proj`, the projected query
    embeddings (a list of 32 lists of 256 floats for blip2-itm-vit-g), which `blip2 index add-embeddings`
    reads."""
    from ..errors import InputError
    from ..jobs import Job

    job = Job("embed", model, {}, {"image_embeds_proj": "list<list<float>>"})

    def embeddings(pipe, good: list) -> list[dict]:
        result = pipe.embed_images(good)
        if "image_embeds_proj" not in result:
            raise InputError(f"{model}: no image projection (ITC): embed jobs need a retrieval checkpoint")
        return [{"image_embeds_proj": vectors.tolist()} for vectors in result["image_embeds_proj"].numpy()]

    _run(load, images, args, job, embeddings)


def _run(load: Callable, images, args: JobArgs, job, run: Callable):
    """Run `job` over `images` into `args.out`, `run(pipe, decoded images)` giving each image's result
    columns; exit 1 when some input failed in this run. The inputs are expanded (a table without its image
    column is an error here) and the output checked (another job's? damaged?) before `load()` loads the
    model."""
    from ..images import load_resized
    from ..jobs import CHUNK_SIZE, open_job, run_job

    ray = _ray_engine(args)
    inputs, extra = _expanded(images, args, job)
    job = replace(job, extra=extra)
    output = open_job(args.out, job, args.overwrite)
    chunk_size = args.chunk_size or CHUNK_SIZE
    if ray is not None:
        prepare = functools.partial(load_resized, config=ray.image_settings(job.model))
        summary = ray.run_ray_job(
            inputs,
            output,
            job,
            prepare,
            load,
            run,
            actors=args.actors,
            chunk_size=chunk_size,
            progress=_progress_bar(),
        )
    else:
        pipe = load()
        summary = run_job(
            inputs,
            output,
            job,
            functools.partial(load_resized, config=pipe.image_config),  # picklable: for --workers N
            lambda good: run(pipe, good),
            batch_size=pipe.batch_size,
            chunk_size=chunk_size,
            workers=args.workers,
            progress=_progress_bar(),
        )
    for error in summary.errors:
        click.echo(f"blip2: {message(error)}", err=True)
    click.echo(f"blip2: {summary.line()}; rows in {message(args.out)}", err=True)
    sys.exit(1 if summary.failed else 0)


def _ray_engine(args: JobArgs):
    """`blip2.jobs.ray_engine` with --engine ray, None without; checked before anything is written: Ray is
    installed, and no option of the other engine is given."""
    if args.engine != "ray":
        if args.actors is not None:
            raise click.UsageError("--actors needs --engine ray")
        return None
    if args.workers is not None:
        raise click.UsageError(
            "--workers is for the local engine: with --engine ray, Ray runs the decode tasks"
        )
    from ..jobs import ray_engine

    ray_engine.import_ray()
    return ray_engine


# Columns every row has: a kept table column may not take one of their names.
_ROW_COLUMNS = ("source", "index", "key", "sha256", "model", "options", "error")


def _expanded(images, args: JobArgs, job) -> tuple[list, tuple[str, ...]]:
    """The job's inputs (`blip2.jobs.inputs.expand_inputs`) and the input columns its rows keep: a shard's
    txt and json when some sample has them, and the --keep columns. Which column of each table is read is
    said on stderr."""
    from ..errors import InputError
    from ..jobs.inputs import expand_inputs

    taken = {*_ROW_COLUMNS, *job.columns, "txt", "json"}
    for name in args.keep:
        if name in taken:
            raise InputError(f"--keep {name}: a job's rows have a column of that name already")
    notes: list[str] = []
    inputs = [*expand_inputs(list(images), column=args.column, keep=args.keep, notes=notes)]
    for note in notes:
        click.echo(f"blip2: {message(note)}", err=True)
    found = {name for item in inputs for name in getattr(item, "extra", {})}
    return inputs, (*(name for name in ("txt", "json") if name in found), *args.keep)


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
