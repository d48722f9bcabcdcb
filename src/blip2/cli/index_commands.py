"""`blip2 index add|remove|prune|info|add-embeddings` and `blip2 search`: thin commands over `blip2.Index`."""

from __future__ import annotations

import datetime
import os
import sys

import click

from ..embeddings_io import path_fields
from .options import DEFAULT_MATCH_MODEL, TEXT, model_options
from .output import cell, json_line, message

INDEX_OPTION = click.option(
    "--index", "-i", "index_path", required=True, help="The index folder (created by the first add)."
)


def index_model_options(func):
    """The model options, --model defaulting to the checkpoint the index was made with (see `_model_name`)."""
    return model_options(func, envvar="BLIP2_MATCH_MODEL", default=None)


@click.group("index")
def index_group():
    """Build and maintain a search index of images (see `blip2 search`).

    \b
    Exit codes: 0 done; 1 some files were skipped (not an image, unreadable:
    each is reported), or the index is busy or damaged; 2 usage error, or the
    index was made with another checkpoint (or embedding size).
    """


@index_group.command("add")
@click.argument("paths", nargs=-1, required=True)
@INDEX_OPTION
@click.option(
    "--caption-model",
    default=None,
    help="A captioning checkpoint: caption each image that has no caption yet, for search --where-caption.",
)
@click.option(
    "--column", default=None, help="A table's image column (paths or bytes; default: found by its name)."
)
@index_model_options
def add_command(
    paths, index_path, caption_model, column, model, device, dtype, quantize, batch_size, as_json
):
    """Add PATHS to the index: image files, folders searched recursively, globs, @LIST files of paths,
    WebDataset tar shards (brace patterns such as "shards/{000..099}.tar" too) and parquet / CSV tables of
    image paths or bytes, as the job commands take them.

    Images are recognised by their content, hidden files and folders are passed over. Images already indexed
    and unchanged are skipped (an unchanged shard is not read), changed ones re-embedded, moved or copied
    ones keep their vectors. An image inside a shard or table is named SOURCE#KEY. Each batch is committed
    as it is done: an interrupted add loses at most one batch, and running it again completes it. --model
    defaults to the index's checkpoint, Salesforce/blip2-itm-vit-g for a new index."""
    from ..index import Index
    from ..jobs.inputs import TABLE_SUFFIXES, expand_inputs

    tables = [path for path in paths if path.lower().endswith(TABLE_SUFFIXES)]
    for _ in expand_inputs(tables, column=column) if tables else ():
        break  # a table without its image column: said before a model is loaded
    pipe = _load(_model_name(index_path, model), device, dtype, quantize, batch_size)
    captioner = _load(caption_model, device, dtype, quantize, batch_size) if caption_model else None
    with Index(index_path, model=pipe) as index, _ProgressBar() as progress:
        report = index.add(list(paths), caption_model=captioner, progress=progress, column=column)
        total = len(index)
    for skipped in report.skipped:
        if as_json:
            click.echo(json_line({**path_fields(skipped.path), "skipped": skipped.reason}))
        else:
            click.echo(f"blip2: skipped: {message(skipped.path)}: {message(skipped.reason)}", err=True)
    counts = {
        "added": len(report.added),
        "reembedded": len(report.reembedded),
        "unchanged": len(report.unchanged),
        "moved": len(report.moved),
        "copied": len(report.copied),
        "skipped": len(report.skipped),
        "count": total,
    }
    if as_json:
        click.echo(json_line({"index": index_path, **counts}))
    click.echo(f"blip2: {message(index_path)}: {report.summary()}; {counts['count']} images in all", err=True)
    sys.exit(1 if report.skipped else 0)


@index_group.command("add-embeddings")
@click.argument("file")
@INDEX_OPTION
@click.option(
    "--model",
    "-m",
    default=None,
    help="The checkpoint the embeddings were made with, recorded as the index's model (not loaded).",
)
def add_embeddings_command(file, index_path, model):
    """Add the embeddings in FILE, written by `blip2 embed --out FILE` (.npy + its .paths.jsonl, .parquet, or
    a job's output) with a retrieval checkpoint: the projected query embeddings (N, 32, 256). No model is
    run. Images inside tar shards or tables are stored as `index add` stores them (SOURCE#KEY)."""
    from ..embeddings_io import read_embedding_rows
    from ..index import Index

    rows = read_embedding_rows(file)
    keys = rows.keys if rows.keys is not None else rows.names
    index = Index(index_path)
    added = index.add_embeddings(keys, rows.array, model_name=model, sources=rows.sources, hashes=rows.hashes)
    click.echo(
        f"blip2: {message(index_path)}: {added} embeddings added; {len(index)} images in all", err=True
    )
    sys.exit(0)


@index_group.command("remove")
@click.argument("paths", nargs=-1, required=True)
@INDEX_OPTION
def remove_command(paths, index_path):
    """Drop PATHS from the index (as given or as absolute paths): image files, SOURCE#KEY (an image inside a
    shard or table), or a shard or table (all its images); the files are not touched."""
    from ..index import Index

    index = Index(index_path)
    removed = index.remove(list(paths))
    click.echo(f"blip2: {message(index_path)}: {removed} removed; {len(index)} images in all", err=True)
    sys.exit(0)


@index_group.command("prune")
@INDEX_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON line per dropped image on stdout.")
def prune_command(index_path, as_json):
    """Drop the images whose file no longer exists, and those of shards or tables that no longer exist or
    (tar shards) no longer hold them."""
    from ..index import Index

    index = Index(index_path)
    gone = index.prune()
    for path in gone:
        click.echo(json_line({**path_fields(path), "removed": True}) if as_json else cell(path))
    click.echo(f"blip2: {message(index_path)}: {len(gone)} pruned; {len(index)} images in all", err=True)
    sys.exit(0)


@index_group.command("info")
@click.argument("index_path", metavar="INDEX")
@click.option("--json", "as_json", is_flag=True, help="Print the information as one JSON object.")
def info_command(index_path, as_json):
    """What INDEX holds: image count, model, embedding size, size on disk, last update, ANN stage."""
    from ..index import Index

    info = Index(index_path).info()
    if as_json:
        click.echo(json_line(info))
        sys.exit(0)
    for key, value in info.items():
        if key in ("created", "updated") and value:
            value = datetime.datetime.fromtimestamp(value, datetime.timezone.utc).isoformat(
                timespec="seconds"
            )
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        click.echo(f"{key}\t{cell(str(value))}")
    sys.exit(0)


@click.command("search")
@click.argument("text", required=False, type=TEXT)
@INDEX_OPTION
@click.option("--image", default=None, help="Search by this image (similar images) instead of a text.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="How many results.")
@click.option("--rerank", is_flag=True, help="Re-rank the top --rerank-k by the ITM head (text only).")
@click.option(
    "--rerank-k", type=click.IntRange(min=1), default=100, show_default=True, help="How many to re-rank."
)
@click.option(
    "--where-caption", type=TEXT, default=None, help="Only images whose caption contains this text."
)
@click.option("--where-path", type=TEXT, default=None, help="Only images whose path matches this glob.")
@index_model_options
def search_command(
    text,
    index_path,
    image,
    k,
    rerank,
    rerank_k,
    where_caption,
    where_path,
    model,
    device,
    dtype,
    quantize,
    batch_size,
    as_json,
):
    """The images of the index that best match TEXT (or --image), best first: rank, score (BLIP-2 ITC, the
    best cosine over the query vectors) and path per line, with the ITM probability after the score when
    re-ranked. --model defaults to the checkpoint the index was made with.

    \b
    Exit codes: 0 done; 1 a re-ranked image could not be read (reported), or the
    index is missing or damaged; 2 usage error, or the index was made with another
    checkpoint (or embedding size) than --model."""
    from ..index import Index, Where

    if (text is None) == (image is None):
        raise click.UsageError("give a TEXT to search for, or --image, not both")
    if rerank and text is None:
        raise click.UsageError("--rerank needs a TEXT query")
    where = Where(caption=where_caption, path=where_path) if where_caption or where_path else None
    with Index(index_path) as unloaded:  # not an index: said before a model is loaded
        stored = unloaded.meta().model
    pipe = _load(model or stored or DEFAULT_MATCH_MODEL, device, dtype, quantize, batch_size)
    hits = Index(index_path, model=pipe).search(
        text=text, image=image, k=k, rerank=rerank, rerank_k=rerank_k, where=where
    )
    failed = False
    for hit in hits:
        failed |= hit.error is not None
        if as_json:
            click.echo(json_line({**hit.to_dict(), **path_fields(hit.image)}))
            continue
        if hit.error is not None:
            click.echo(f"blip2: error: {message(hit.image)}: {message(hit.error)}", err=True)
        match = f"\t{hit.match:.4f}" if rerank and hit.match is not None else ("\t-" if rerank else "")
        click.echo(f"{hit.rank}\t{hit.score:.4f}{match}\t{cell(hit.image)}")
    sys.exit(1 if failed else 0)


def _model_name(index_path: str, given: str | None) -> str:
    """--model when given, else the checkpoint the index was made with, else the default retrieval one. A local
    checkpoint directory is made absolute, so that the name the index records still finds it from another
    working directory."""
    if given:
        return os.path.abspath(given) if os.path.isdir(given) else given
    if os.path.isdir(index_path):
        from ..index import Index

        with Index(index_path) as index:
            return index.meta().model or DEFAULT_MATCH_MODEL
    return DEFAULT_MATCH_MODEL


def _load(model: str, device, dtype, quantize, batch_size: int):
    from .commands import _load as load

    return load(model, device, dtype, quantize, batch_size)


class _ProgressBar:
    """A tqdm bar on stderr (on a terminal only, as the other commands), fed by `Index.add`'s progress."""

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        self.bar.close()
