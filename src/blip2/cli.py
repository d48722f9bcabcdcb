"""The `blip2` command: thin commands over the library API.

Bad images never stop a run: each gets a one-line error naming the file (or a JSON error line with
--json), the others are still processed, and the exit code is 1. Nothing prints a traceback unless
BLIP2_DEBUG=1 is set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator

import click

from .errors import Blip2Error, InputError

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
# Matching needs the Q-Former's text path, which only the retrieval checkpoints have.
DEFAULT_MATCH_MODEL = "Salesforce/blip2-itm-vit-g"
PROGRESS_THRESHOLD = 8  # show a progress bar from this many images on


def _generation_options(func):
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


def _model_options(func, envvar: str = "BLIP2_MODEL", default: str = DEFAULT_MODEL):
    options = [
        click.option(
            "--model",
            "-m",
            envvar=envvar,
            default=default,
            show_default=True,
            help=f"Checkpoint directory or Hub repo id (env {envvar}).",
        ),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on CPU)."),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Images per forward pass.",
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON line per input image on stdout."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blip2")
def cli():
    """BLIP-2 from the command line: caption images, answer questions about them, match them with texts,
    embed them, and label them zero-shot."""


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--prompt", "-p", default=None, help="Text the caption continues (e.g. 'a photo of').")
@_model_options
@_generation_options
def caption(images, prompt, model, device, dtype, batch_size, as_json, **generation):
    """Caption IMAGES (files). Defaults: 5 beams, at most 30 new tokens."""
    pipe = _load(model, device, dtype)
    options = {k: v for k, v in generation.items() if v is not None}

    def run(pixels, count):
        return pipe.generate_text(
            pixels, list(range(count)), [prompt or ""] * count, task_options("caption", options)
        )

    failed = False
    for path, result in _per_image(pipe, images, batch_size, run):
        failed |= _emit(path, result, as_json, lambda text: {"caption": text}, len(images) > 1)
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("image")
@click.argument("questions", nargs=-1, required=True)
@click.option("--template", default=None, help="Prompt template with {} for the question.")
@_model_options
@_generation_options
def ask(image, questions, template, model, device, dtype, batch_size, as_json, **generation):
    """Answer QUESTIONS about IMAGE. Defaults: 5 beams, at most 10 new tokens, length penalty -1."""
    for q in questions:
        if not q.strip():
            raise click.BadParameter("a question is empty", param_hint="QUESTIONS")
    pipe = _load(model, device, dtype)
    template = template or pipe.template
    if "{}" not in template:
        raise click.BadParameter(f"{template!r} has no '{{}}' for the question", param_hint="--template")
    options = {k: v for k, v in generation.items() if v is not None}
    prompts = [template.format(q.strip()) for q in questions]

    def run(pixels, count):
        return [pipe.generate_text(pixels, [0] * len(prompts), prompts, task_options("ask", options))]

    failed = False
    for path, result in _per_image(pipe, [image], 1, run):
        if isinstance(result, Exception):
            failed |= _emit(path, result, as_json, None, False)
            continue
        if as_json:
            answers = [{"question": q, "answer": a} for q, a in zip(questions, result)]
            click.echo(json.dumps({"image": path, "answers": answers}, ensure_ascii=False))
        else:
            for q, a in zip(questions, result):
                click.echo(f"{q}\t{a}" if len(questions) > 1 else a)
    sys.exit(1 if failed else 0)


def _match_options(func):
    return _model_options(func, envvar="BLIP2_MATCH_MODEL", default=DEFAULT_MATCH_MODEL)


@cli.command()
@click.argument("image")
@click.argument("texts", nargs=-1, required=True)
@_match_options
def match(image, texts, model, device, dtype, batch_size, as_json):
    """ITM: the probability that IMAGE matches each of TEXTS."""
    pipe = _load(model, device, dtype)
    (decoded,) = _decode([image])
    if isinstance(decoded, Exception):
        sys.exit(_emit(image, decoded, as_json, None, False))
    probs = pipe.match(decoded, list(texts))
    if as_json:
        rows = [{"text": t, "probability": p} for t, p in zip(texts, probs)]
        click.echo(json.dumps({"image": image, "matches": rows}, ensure_ascii=False))
    else:
        for t, p in zip(texts, probs):
            click.echo(f"{p:.4f}\t{t}")
    sys.exit(0)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--text", "-t", "texts", multiple=True, required=True, help="A text to compare with (repeatable)."
)
@_match_options
def similarity(images, texts, model, device, dtype, batch_size, as_json):
    """ITC: the similarity of each of IMAGES with each --text (best cosine over the query tokens)."""
    pipe = _load(model, device, dtype)
    failed = False
    if not as_json:
        click.echo("image\t" + "\t".join(texts))
    for path, result in _per_decoded(
        images, batch_size, lambda good: pipe.similarity(good, list(texts)).tolist()
    ):
        if isinstance(result, Exception):
            failed |= _emit(path, result, as_json, None, False)
        elif as_json:
            rows = [{"text": t, "score": s} for t, s in zip(texts, result)]
            click.echo(json.dumps({"image": path, "scores": rows}, ensure_ascii=False))
        else:
            click.echo(path + "\t" + "\t".join(f"{s:.4f}" for s in result))
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: .npy (paths in FILE.paths.txt beside it) or .parquet (an 'image' column).",
)
@_match_options
def embed(images, out, model, device, dtype, batch_size, as_json):
    """Embed IMAGES for search: projected, normalised query embeddings (N, 32, 256) when the checkpoint has
    them (retrieval checkpoints), else the Q-Former outputs (N, 32, 768). Bad images are left out."""
    from .embeddings_io import check_output_path, write_embeddings

    check_output_path(out)
    pipe = _load(model, device, dtype)

    def run(good):
        result = pipe.embed_images(good)
        return list(result.get("image_embeds_proj", result["image_embeds"]).numpy())

    kept_paths, vectors, failed = [], [], False
    for path, result in _per_decoded(images, batch_size, run):
        if isinstance(result, Exception):
            failed |= _emit(path, result, as_json, None, False)
            continue
        if as_json:
            click.echo(json.dumps({"image": path, "row": len(vectors), "out": out}, ensure_ascii=False))
        kept_paths.append(path)
        vectors.append(result)
    if vectors:
        shape = write_embeddings(out, kept_paths, vectors)
        if not as_json:
            click.echo(f"wrote {shape[0]} embeddings of shape {tuple(shape[1:])} to {out}", err=True)
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("image")
@click.option("--labels", "-l", required=True, help="Comma-separated labels, e.g. 'cat,dog,car'.")
@click.option("--template", default="a photo of {}", show_default=True, help="Prompt with {} for the label.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep the k best labels.")
@click.option("--rerank", is_flag=True, help="Re-rank the candidates by ITM (image and text read together).")
@_match_options
def classify(image, labels, template, top_k, rerank, model, device, dtype, batch_size, as_json):
    """Zero-shot classification of IMAGE among --labels (ITC; probabilities: softmax of similarity / 0.07)."""
    names = [label.strip() for label in labels.split(",") if label.strip()]
    if not names:
        raise click.BadParameter("no labels given", param_hint="--labels")
    pipe = _load(model, device, dtype)
    (decoded,) = _decode([image])
    if isinstance(decoded, Exception):
        sys.exit(_emit(image, decoded, as_json, None, False))
    ranked = pipe.classify(decoded, names, template=template, top_k=top_k, rerank=rerank)
    if as_json:
        click.echo(json.dumps({"image": image, "labels": ranked}, ensure_ascii=False))
    else:
        for row in ranked:
            extra = f"\tmatch {row['match']:.4f}" if "match" in row else ""
            click.echo(f"{row['label']}\t{row['probability']:.4f}\t(score {row['score']:.4f}){extra}")
    sys.exit(0)


def _decode(paths) -> list:
    """Each path decoded to an upright RGB image, or the ImageError naming it."""
    from .images import load_image

    decoded = []
    for path in paths:
        try:
            decoded.append(load_image(path))
        except Blip2Error as e:
            decoded.append(e)
    return decoded


def _per_decoded(paths, batch_size: int, run: Callable) -> Iterator[tuple[str, object]]:
    """Like _per_image for the matching commands: `run` takes decoded images and returns one result each."""
    from tqdm import tqdm

    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=len(paths) < PROGRESS_THRESHOLD)
    try:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            decoded = _decode(chunk)
            good = [d for d in decoded if not isinstance(d, Exception)]
            results = iter(run(good) if good else [])
            for path, d in zip(chunk, decoded):
                yield path, d if isinstance(d, Exception) else next(results)
            bar.update(len(chunk))
    finally:
        bar.close()


def task_options(task: str, options: dict) -> dict:
    from .pipeline import task_options

    return task_options(task, options)


def _load(model: str, device: str | None, dtype: str | None):
    from .pipeline import load

    return load(model, device=device, dtype=dtype)


def _per_image(pipe, paths, batch_size: int, run: Callable) -> Iterator[tuple[str, object]]:
    """Yield (path, result or exception) in input order; a bad image fails alone."""
    import torch
    from tqdm import tqdm

    from .images import preprocess_one

    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=len(paths) < PROGRESS_THRESHOLD)
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            results: list[object] = []
            good: list[tuple[int, torch.Tensor]] = []
            for i, path in enumerate(chunk):
                try:
                    good.append((i, preprocess_one(path, pipe.image_config)))
                    results.append(None)
                except Blip2Error as e:
                    results.append(e)
            if good:
                texts = run(torch.stack([t for _, t in good]), len(good))
                for (i, _), text in zip(good, texts):
                    results[i] = text
            for path, result in zip(chunk, results):
                yield path, result
            bar.update(len(chunk))
    finally:
        bar.close()


def _emit(path: str, result, as_json: bool, fields, show_path: bool) -> bool:
    """Print one result line; return True when it is an error."""
    if isinstance(result, Exception):
        if as_json:
            click.echo(json.dumps({"image": path, "error": str(result)}, ensure_ascii=False))
        else:
            click.echo(f"blip2: error: {result}", err=True)
        return True
    if as_json:
        click.echo(json.dumps({"image": path, **fields(result)}, ensure_ascii=False))
    else:
        click.echo(f"{path}\t{result}" if show_path else result)
    return False


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line on stderr."""
    try:
        cli.main(args=argv, prog_name="blip2", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("blip2: aborted", err=True)
        sys.exit(130)
    except InputError as e:
        click.echo(f"blip2: error: {e}", err=True)
        sys.exit(2)
    except Blip2Error as e:
        click.echo(f"blip2: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("blip2: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # never a raw traceback, unless asked for
        if os.environ.get("BLIP2_DEBUG"):
            raise
        click.echo(
            f"blip2: internal error: {type(e).__name__}: {e} (set BLIP2_DEBUG=1 for the traceback)", err=True
        )
        sys.exit(3)


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

    from .lavis import convert_lavis

    report = convert_lavis(Path(checkpoint), base, Path(out), force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    click.echo(report.summary(), err=True)
    if report.dropped:
        click.echo(report.dropped_note(), err=True)
    sys.exit(0)
