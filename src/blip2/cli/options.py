"""The options the commands share, each value checked by the library's own rule before the model loads."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from ..embeddings_io import valid_text
from ..errors import InputError

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
# Matching needs the Q-Former's text path, which only the retrieval checkpoints have.
DEFAULT_MATCH_MODEL = "Salesforce/blip2-itm-vit-g"


class _Text(click.ParamType):
    """Text from the command line. Arguments that are not valid UTF-8 reach Python with their undecodable
    bytes as lone surrogates, which no tokenizer can read: they are a usage error."""

    name = "text"

    def convert(self, value, param, ctx):
        if valid_text(value) != value:
            self.fail(f"'{valid_text(value)}' is not valid UTF-8 text", param, ctx)
        return value


TEXT = _Text()


def _check_device(ctx, param, value: str | None) -> str | None:
    """Refuse a device that is misspelt or not on this machine before the model is loaded."""
    if value is not None:
        from ..loading.loader import parse_device

        _as_bad_parameter(parse_device, value)
    return value


def _check_dtype(ctx, param, value: str | None) -> str | None:
    """Refuse an unknown dtype before the model is looked for (fetching a Hub checkpoint takes minutes)."""
    if value is not None:
        import torch

        from ..loading.loader import parse_dtype

        _as_bad_parameter(parse_dtype, value, torch.device("cpu"))
    return value


def _as_bad_parameter(check: Callable, *args) -> None:
    """The library's own check of an option's value, its InputError as click's usage error (exit 2)."""
    try:
        check(*args)
    except InputError as e:
        raise click.BadParameter(str(e)) from None


def generation_options(func):
    """The decoding options shared by the commands; unset ones keep the command's defaults."""
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), help="Most tokens to generate."),
        click.option("--min-new-tokens", type=click.IntRange(min=0), help="Fewest tokens to generate."),
        click.option("--beams", "num_beams", type=click.IntRange(min=1), help="Beam width (1 = greedy)."),
        click.option("--length-penalty", type=float, help="Beam score length exponent (<0 favours short)."),
        click.option("--repetition-penalty", type=float, help="Penalty (>1) on tokens already present."),
        click.option("--no-repeat-ngram-size", type=click.IntRange(min=0), help="Ban repeated n-grams."),
        click.option("--sample", "do_sample", is_flag=True, default=None, help="Sample instead of search."),
        click.option("--temperature", type=float, help="Sampling temperature."),
        click.option("--top-k", type=click.IntRange(min=0), help="Sample from the k most likely tokens."),
        click.option("--top-p", type=float, help="Sample from the smallest set with this much probability."),
        click.option("--seed", type=int, help="Random seed for sampling."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func, envvar: str = "BLIP2_MODEL", default: str | None = DEFAULT_MODEL):
    options = [
        click.option(
            "--model",
            "-m",
            envvar=envvar,
            default=default,
            show_default=True,
            help=f"Checkpoint directory or Hub repo id (env {envvar}).",
        ),
        click.option(
            "--device",
            default=None,
            callback=_check_device,
            help="cpu, cuda, cuda:1 ... (default: cuda if available).",
        ),
        click.option(
            "--dtype",
            default=None,
            callback=_check_dtype,
            help="float32, float16 or bfloat16 (default: float32 on CPU).",
        ),
        click.option(
            "--quantize",
            type=click.Choice(["int8", "int8-all", "int4"], case_sensitive=False),
            default=None,
            help="int8: the language model in int8 (CPU: dynamic int8 kernels, faster; GPU: weight-only); "
            "int8-all: the vision tower and Q-Former too (faster still, agrees less with float); "
            "int4: the language model, weight-only, CUDA only.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Images (ask: questions) per forward pass.",
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON line per input image on stdout."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def match_options(func):
    return model_options(func, envvar="BLIP2_MATCH_MODEL", default=DEFAULT_MATCH_MODEL)


def job_options(func):
    """--out and what goes with it: the command as a resumable job (see blip2.jobs)."""
    options = [
        click.option(
            "--out",
            "-o",
            default=None,
            help="Run as a resumable job writing one row per input to OUT: a .parquet folder of parts or a "
            ".jsonl file. The same command again skips what is done.",
        ),
        click.option("--overwrite", is_flag=True, help="With --out: replace the output of another job."),
        click.option(
            "--chunk-size",
            type=click.IntRange(min=1),
            default=None,
            help="With --out: rows per committed chunk, a kill loses at most one (default 256).",
        ),
        click.option(
            "--column",
            default=None,
            help="With --out, for .parquet/.csv inputs: the column of image paths or bytes (default: the "
            "first of image, image_path, path, file, filename, ..., jpg, png, bytes present).",
        ),
        click.option(
            "--keep",
            multiple=True,
            help="With --out, for .parquet/.csv inputs: a table column to copy into each row (repeatable).",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=None,
            help="With --out: processes that read and decode images ahead of the model (0: in turn, in the "
            "main thread; default: a few threads).",
        ),
        click.option(
            "--engine",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="With --out: run here, or as a Ray Data pipeline on a local Ray or the cluster at "
            "RAY_ADDRESS (decode tasks, one model per actor and GPU).",
        ),
        click.option(
            "--actors",
            type=click.IntRange(min=1),
            default=None,
            help="With --engine ray: model actors (default: one per GPU of the cluster, or 1).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return _refusing_job_options_without_out(func)


def _refusing_job_options_without_out(command):
    """`command` that first refuses any job option given without --out (it would be silently ignored)."""

    @functools.wraps(command)
    def checked(*args, **kwargs):
        if kwargs.get("out") is None:
            from .job_commands import JobArgs, refuse_job_options

            given = {field: kwargs[field] for field in JobArgs.__dataclass_fields__ if field in kwargs}
            refuse_job_options(JobArgs(**given), "without --out")
        return command(*args, **kwargs)

    return checked
