"""`blip2 eval`'s three evaluations, each from files to one result dict (metrics, counts, per-item scores).

Counts say what was evaluated: annotated items, items with a result (only those are scored, as the COCO
and VQA scripts score the results given), failed job rows. The model-facing part of retrieval is here too:
embeddings in chunks (only the (N, 32, 256) projections are kept), then one ITM pass per image.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import captions, datasets, vqa
from .meteor import MeteorUnavailable, meteor
from .tokenize import tokenize

if TYPE_CHECKING:
    from torch import Tensor

    from ..tasks.api import Blip2

EMBED_CHUNK = 256  # images or texts per embedding call: bounds the (B, L, 768) text features in memory


def evaluate_captions(
    annotations: str | Path,
    results: str | Path,
    split: str | None = "test",
    meteor_jar: str | os.PathLike | None = None,
    with_meteor: bool = True,
) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of `results` against `annotations` (see `datasets`), over
    the annotated images that have a caption. METEOR is a float, or "n/a (why)" without java or its jar."""
    data = datasets.read_caption_annotations(annotations, split)
    found = datasets.read_caption_results(results, data)
    keys = [k for k in data.refs if k in found.results]
    if not keys:
        raise datasets.DataError(f"{results}: no caption for any image of {annotations}")
    refs = {k: [tokenize(c) for c in data.refs[k]] for k in keys}
    cands = {k: [tokenize(found.results[k])] for k in keys}
    (b1, b2, b3, b4), bleu_each = captions.bleu(refs, cands)
    rouge, rouge_each = captions.rouge_l(refs, cands)
    cider, cider_each = captions.cider_d(refs, cands)
    metrics: dict[str, Any] = {"BLEU-1": b1, "BLEU-2": b2, "BLEU-3": b3, "BLEU-4": b4}
    per_image: dict[str, dict[str, Any]] = {
        str(k): {"BLEU-4": bleu_each[3][i], "ROUGE-L": rouge_each[i], "CIDEr": cider_each[i]}
        for i, k in enumerate(keys)
    }
    metrics["METEOR"] = _meteor(refs, cands, keys, meteor_jar, per_image) if with_meteor else "n/a (skipped)"
    metrics["ROUGE-L"], metrics["CIDEr"] = rouge, cider
    counts = _counts(len(data.refs), len(keys), found)
    return {"task": "caption", "metrics": metrics, "counts": counts, "per_image": per_image}


def _meteor(refs, cands, keys: list[Hashable], jar, per_image: dict[str, dict[str, Any]]) -> float | str:
    try:
        score, each = meteor(captions.pairs(refs, cands), jar)
    except MeteorUnavailable as e:
        return f"n/a ({e})"
    for key, value in zip(keys, each):
        per_image[str(key)]["METEOR"] = value
    return score


def evaluate_vqa(questions: str | Path, annotations: str | Path, results: str | Path) -> dict[str, Any]:
    """VQA accuracy (official normalisation and 10-annotator rule) of `results` on the annotated questions
    that have an answer: overall and per answer type."""
    annotated = datasets.read_vqa(questions, annotations)
    found = datasets.read_vqa_results(results, annotated)
    if not found.results:
        raise datasets.DataError(f"{results}: no answer to any question of {annotations}")
    scores = vqa.evaluate(annotated, found.results)
    metrics = {
        "accuracy": scores["overall"],
        **{f"accuracy ({t})": v for t, v in scores["per_answer_type"].items()},
    }
    counts = _counts(len(annotated), scores["questions"], found)
    per_question = {str(q): v for q, v in scores["per_question"].items()}
    return {"task": "vqa", "metrics": metrics, "counts": counts, "per_question": per_question}


def _counts(annotated: int, evaluated: int, found: datasets.Found) -> dict[str, int]:
    """What was evaluated: `missing` items have no result (`failed` of them failed in the job); `ignored`
    results are for items not annotated (or in another split)."""
    missing = annotated - evaluated
    return {
        "annotated": annotated,
        "evaluated": evaluated,
        "missing": missing,
        "failed": found.failed,
        "ignored": found.ignored,
    }


def evaluate_retrieval(
    model: Blip2,
    annotations: str | Path | datasets.CaptionData,
    images: str | Path,
    split: str | None = "test",
    k: int = 128,
) -> dict[str, Any]:
    """R@1/5/10 both ways, with ITC alone and with ITC + ITM re-ranking of the top `k` (see `retrieval`),
    of `model` on the annotated images (files under `images`) and their captions (`annotations`: a file,
    or what `datasets.read_caption_annotations` read from one)."""
    from .retrieval import lavis_text, rerank_both, retrieval_metrics

    data = annotations
    if not isinstance(data, datasets.CaptionData):  # else already read (the CLI reads it before loading)
        data = datasets.read_caption_annotations(data, split)
    folder = Path(images)
    keys = list(data.refs)
    paths = [str(folder / data.files[key]) for key in keys]
    texts = [lavis_text(caption) for key in keys for caption in data.refs[key]]
    text_image = [i for i, key in enumerate(keys) for _ in data.refs[key]]
    image_texts: list[list[int]] = [[] for _ in keys]
    for t, i in enumerate(text_image):
        image_texts[i].append(t)

    itc = itc_matrix(model, paths, texts)  # (I, T)
    i2t, t2i = rerank_both(
        itc, k, lambda image, chosen: itm_logits(model, paths[image], [texts[t] for t in chosen])
    )
    metrics = {
        "ITC": retrieval_metrics(itc, itc.T, image_texts, text_image),
        f"ITC+ITM (top {k})": retrieval_metrics(i2t, t2i, image_texts, text_image),
    }
    counts = {"images": len(keys), "texts": len(texts)}
    return {"task": "retrieval", "metrics": metrics, "counts": counts, "k": k}


def itc_matrix(model: Blip2, images: Sequence[str], texts: Sequence[str]) -> Tensor:
    """The ITC similarity (I, T) of every image with every text, as `model.similarity`, embedding
    `EMBED_CHUNK` images or texts at a time."""
    import torch

    from ..models.retrieval import similarity

    image_proj = torch.cat(
        [
            model.embed_images(list(images[i : i + EMBED_CHUNK]))["image_embeds_proj"]
            for i in range(0, len(images), EMBED_CHUNK)
        ]
    )  # (I, 32, 256)
    text_proj = torch.cat(
        [
            model.embed_texts(list(texts[i : i + EMBED_CHUNK]))["text_embeds_proj"]
            for i in range(0, len(texts), EMBED_CHUNK)
        ]
    )  # (T, 256)
    return similarity(image_proj, text_proj)


def itm_logits(model: Blip2, image: str, texts: list[str]) -> Tensor:
    """The ITM head's match logit (class 1, mean over the queries: LAVIS's `compute_itm`) of `image` with
    each text (T,); the image is encoded once."""
    import torch

    from ..models.retrieval import Blip2ForImageTextRetrieval

    features = model.embed_multimodal(image, texts)  # (T, 32, 768), checks the checkpoint has an ITM head
    head = cast(Blip2ForImageTextRetrieval, model.model)
    with torch.inference_mode():
        return head.itm_logits(features.to(model.device))[:, 1].float().cpu()
