"""`blip2 eval caption|vqa|retrieval`: metrics of results (or of a retrieval model) against annotation
files, as a table on stdout (scores x100, as papers print them) and, with --json, the whole result (scores
in [0, 1], counts, per-item scores) as JSON. The evaluation code (`blip2.eval`) is imported when a command
runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from .options import DEFAULT_MATCH_MODEL, _check_device, _check_dtype
from .output import cell, message

_JSON_HELP = "Also write the full result as JSON to this file ('-': stdout, instead of the table)."
_SPLIT_HELP = (
    "The split of a Karpathy-style annotation file (test, val, train, restval); other formats hold one."
)


@click.group("eval")
def eval_group():
    """Evaluate captions, VQA answers or retrieval against annotation files (COCO, Karpathy, VQAv2).

    \b
    blip2 eval caption --annotations captions_val2014.json --results results.json
    blip2 eval vqa --questions Q.json --annotations A.json --results answers.jsonl
    blip2 eval retrieval --annotations dataset_flickr30k.json --images flickr30k-images/ -m Salesforce/blip2-itm-vit-g
    """


@eval_group.command("caption")
@click.option(
    "--annotations", "-a", required=True, help="COCO captions, Karpathy split or LAVIS annotation JSON."
)
@click.option(
    "--results",
    "-r",
    required=True,
    help="COCO results JSON [{image_id, caption}], or a caption job's --out.",
)
@click.option("--split", default="test", show_default=True, help=_SPLIT_HELP)
@click.option(
    "--meteor-jar", default=None, help="meteor-1.5.jar (default: $BLIP2_METEOR_JAR, then pycocoevalcap's)."
)
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (it needs java and takes a while to start).")
@click.option("--json", "json_out", default=None, help=_JSON_HELP)
def caption_command(annotations, results, split, meteor_jar, no_meteor, json_out):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of captions, as the COCO caption evaluation (pycocoevalcap)
    computes them (its PTB tokenization included). METEOR needs java: without it, the row says why."""
    from ..eval.run import evaluate_captions

    _check_out(json_out)
    result = evaluate_captions(annotations, results, split, meteor_jar, with_meteor=not no_meteor)
    _finish(result, json_out, _metric_rows(result["metrics"]), "images", "without a caption")


@eval_group.command("vqa")
@click.option("--questions", "-q", required=True, help="VQA questions JSON ({questions: [...]}).")
@click.option("--annotations", "-a", required=True, help="VQA annotations JSON ({annotations: [...]}).")
@click.option(
    "--results", "-r", required=True, help="VQA results JSON [{question_id, answer}], or an ask job's --out."
)
@click.option("--json", "json_out", default=None, help=_JSON_HELP)
def vqa_command(questions, annotations, results, json_out):
    """VQA accuracy with the official answer normalisation and the 10-annotator min(#/3, 1) rule, overall
    and per answer type."""
    from ..eval.run import evaluate_vqa

    _check_out(json_out)
    result = evaluate_vqa(questions, annotations, results)
    _finish(result, json_out, _metric_rows(result["metrics"]), "questions", "without an answer")


@eval_group.command("retrieval")
@click.option(
    "--annotations", "-a", required=True, help="COCO captions, Karpathy split or LAVIS annotation JSON."
)
@click.option("--images", "-i", required=True, help="The folder the annotations' image file names are in.")
@click.option(
    "--model",
    "-m",
    envvar="BLIP2_MATCH_MODEL",
    default=DEFAULT_MATCH_MODEL,
    show_default=True,
    help="A retrieval checkpoint (env BLIP2_MATCH_MODEL).",
)
@click.option(
    "--k", "k", type=click.IntRange(min=1), default=128, show_default=True, help="ITM re-ranks the top k."
)
@click.option("--split", default="test", show_default=True, help=_SPLIT_HELP)
@click.option("--device", default=None, callback=_check_device, help="cpu, cuda, cuda:1 ...")
@click.option("--dtype", default=None, callback=_check_dtype, help="float32, float16 or bfloat16.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per pass."
)
@click.option("--json", "json_out", default=None, help=_JSON_HELP)
def retrieval_command(annotations, images, model, k, split, device, dtype, batch_size, json_out):
    """Image-text retrieval R@1/5/10, image->text and text->image, with ITC alone and with the top k
    re-ranked by ITC + ITM (as LAVIS evaluates BLIP-2; the paper uses k=128)."""
    from ..eval.datasets import read_caption_annotations
    from ..eval.run import evaluate_retrieval
    from ..tasks.api import load

    _check_out(json_out)
    if not Path(images).is_dir():
        raise click.BadParameter(f"{message(images)} is not a folder", param_hint="--images")
    data = read_caption_annotations(annotations, split)  # a bad file fails before the model loads
    pipe = load(model, device=device, dtype=dtype)
    pipe.batch_size = batch_size
    result = evaluate_retrieval(pipe, data, images, split, k)
    result["model"] = model
    _finish(result, json_out, _retrieval_rows(result["metrics"]), None, None)


# -- output -------------------------------------------------------------------------------------------------
def _check_out(json_out: str | None) -> None:
    """Refuse a --json destination that cannot be written before anything is computed."""
    if json_out not in (None, "-"):
        parent = Path(json_out).parent
        if not parent.is_dir() or Path(json_out).is_dir():
            raise click.BadParameter(
                f"{message(json_out)}: not a file in an existing folder", param_hint="--json"
            )


def _finish(
    result: dict[str, Any], json_out: str | None, rows: list[str], items: str | None, missing: str | None
):
    if json_out == "-":
        click.echo(json.dumps(result, ensure_ascii=False, default=str))
    else:
        for row in rows:
            click.echo(row)
    if json_out not in (None, "-"):
        try:
            Path(json_out).write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str) + "\n")
        except OSError as e:
            click.echo(f"blip2: error: {message(json_out)}: cannot be written ({e.strerror or e})", err=True)
            sys.exit(1)
    if items is not None:
        _note_counts(result["counts"], items, missing)
    sys.exit(0)


def _note_counts(counts: dict[str, int], items: str, missing: str | None) -> None:
    line = f"blip2: evaluated {counts['evaluated']} of {counts['annotated']} annotated {items}"
    if counts["missing"]:
        line += f"; {counts['missing']} {missing}"
        line += f" ({counts['failed']} failed in the job)" if counts["failed"] else ""
    if counts["ignored"]:
        line += f"; {counts['ignored']} results for {items} not annotated (or in another split) ignored"
    click.echo(line, err=True)


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    width = max(len(name) for name in metrics)
    return [f"{name:<{width}}  {_percent(value)}" for name, value in metrics.items()]


def _retrieval_rows(metrics: dict[str, dict[str, float]]) -> list[str]:
    columns = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean"]
    width = max(len(name) for name in metrics)
    rows = [f"{'':<{width}}  " + "  ".join(f"{c:>8}" for c in columns)]
    for name, values in metrics.items():
        rows.append(f"{name:<{width}}  " + "  ".join(f"{_percent(values[c]):>8}" for c in columns))
    return rows


def _percent(value: Any) -> str:
    """A score in [0, 1] as a percentage with two decimals (CIDEr: x100 as well, as papers print it)."""
    if isinstance(value, str):
        return cell(value)
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"
