"""Image-text matching (ITM), contrastive similarity (ITC), embeddings and zero-shot classification.

Each task takes the loaded pipeline object (`blip2.pipeline.Blip2`) first; the pipeline exposes them as
methods. They need a retrieval checkpoint (`Salesforce/blip2-itm-vit-g`, `-coco`: Hugging Face's
`Blip2ForImageTextRetrieval`), whose Q-Former also reads text; `embed_images` works on every checkpoint.

Images are decoded and run through the vision tower once per call, however many texts they meet. Texts are
tokenized with the checkpoint's BERT tokenizer ([CLS] text [SEP], right-padded) and truncated to the Q-Former's
`max_position_embeddings` tokens (512 in the released checkpoints), keeping the final [SEP], as the reference
tokenizer does with `truncation=True, max_length=512`. Results are float32 tensors on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import inputs
from .errors import CheckpointError, InputError
from .models.retrieval import similarity as itc_similarity

if TYPE_CHECKING:  # pipeline imports this module to delegate to it: no import cycle at run time
    from .pipeline import Blip2

ImageInput = Any  # a path, bytes, a PIL image or a numpy array

# The ITC temperature for `classify`'s probabilities. LAVIS learns it (`temp`, initialised at 0.07), but the
# Hugging Face conversion drops it, so the released HF checkpoints do not carry it: we use LAVIS's 0.07.
ITC_TEMPERATURE = 0.07
# Image-text pairs per Q-Former pass in ITM (bounds memory when one image meets thousands of texts).
ITM_BATCH = 128

RETRIEVAL_CHECKPOINTS = (
    "a retrieval checkpoint such as Salesforce/blip2-itm-vit-g or Salesforce/blip2-itm-vit-g-coco"
)


# -- tasks ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def match(
    pipe: Blip2, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
) -> float | list[float]:
    """The ITM probability that each image matches its text (softmax of the ITM head, class 1).

    One image and one text -> float. One image and several texts, or several images and one text, -> one
    probability per text / image (each image is encoded once). Several of each, the same number -> pairwise.
    """
    _require(pipe, "match images and texts (ITM)", "embeddings", "itm_head")
    image_list, text_list = inputs.as_list(images, "images"), inputs.texts(texts)
    rows, text_list = inputs.pairs(len(image_list), text_list)
    multimodal = _paired_multimodal(pipe, image_list, rows, text_list)
    probs = pipe.model.itm_logits(multimodal).float().softmax(dim=-1)[:, 1].tolist()
    return probs[0] if not inputs.is_list(images) and not inputs.is_list(texts) else probs


@torch.inference_mode()
def similarity(pipe: Blip2, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]) -> Tensor:
    """ITC similarity matrix (n_images, n_texts): for each pair, the largest cosine between the image's
    projected query outputs (one per query token) and the text's projected [CLS] output, in [-1, 1]."""
    _require(pipe, "compute ITC similarity", "vision_projection", "embeddings", "text_projection")
    image_list, text_list = inputs.as_list(images, "images"), inputs.texts(texts)
    image_proj = _per_image_chunk(
        pipe, image_list, lambda embeds: pipe.model.project_images(pipe.model.query(embeds))
    )  # (I, Q, 256)
    features, _ = _text_features(pipe, text_list)
    text_proj = pipe.model.project_texts(features)  # (T, 256)
    return _out(itc_similarity(image_proj, text_proj))


@torch.inference_mode()
def embed_images(pipe: Blip2, images: ImageInput | Sequence[ImageInput]) -> dict[str, Tensor]:
    """Image features, one row per image (a single image gives a batch of one):

    - `image_embeds` (B, Q, 768): the Q-Former's query outputs;
    - `image_embeds_proj` (B, Q, 256): their L2-normalised ITC projections, what `similarity` compares. Only
      retrieval checkpoints have the projection: for captioning checkpoints this key is absent.
    """
    features = _per_image_chunk(pipe, inputs.as_list(images, "images"), pipe.model.query)  # (B, Q, 768)
    out = {"image_embeds": _out(features)}
    if hasattr(pipe.model, "vision_projection"):
        out["image_embeds_proj"] = _out(pipe.model.project_images(features))
    return out


@torch.inference_mode()
def embed_texts(pipe: Blip2, texts: str | Sequence[str]) -> dict[str, Tensor]:
    """Text features from the Q-Former reading the text alone, one row per text:

    - `text_embeds` (B, L, 768): every token's output, right-padded to the longest text;
    - `attention_mask` (B, L): 1 for tokens, 0 for padding;
    - `text_embeds_proj` (B, 256): the L2-normalised ITC projection of the [CLS] output.
    """
    _require(pipe, "embed texts", "embeddings", "text_projection")
    features, mask = _text_features(pipe, inputs.texts(texts))
    return {
        "text_embeds": _out(features),
        "attention_mask": mask.cpu(),
        "text_embeds_proj": _out(pipe.model.project_texts(features)),
    }


@torch.inference_mode()
def embed_multimodal(
    pipe: Blip2, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
) -> Tensor:
    """Multimodal features (N, Q, 768): the query outputs of the Q-Former reading each image (cross-attention)
    and its text (self-attention) together, as LAVIS's extract_features(mode="multimodal"). Images and texts
    pair up as in `match`."""
    _require(pipe, "embed images with texts", "embeddings", "itm_head")
    image_list, text_list = inputs.as_list(images, "images"), inputs.texts(texts)
    rows, text_list = inputs.pairs(len(image_list), text_list)
    return _out(_paired_multimodal(pipe, image_list, rows, text_list))


@torch.inference_mode()
def classify(
    pipe: Blip2,
    image: ImageInput,
    labels: Sequence[str],
    template: str = "a photo of {}",
    rerank: bool = False,
    top_k: int | None = None,
    temperature: float = ITC_TEMPERATURE,
) -> list[dict[str, Any]]:
    """Zero-shot classification of one image among `labels`, best first.

    Each label is put into `template` ("{}" marks where) and compared with the image by ITC. Each result is
    `{"label", "score", "probability"}`: `score` is the ITC similarity (the best cosine over the query tokens,
    as `similarity`), `probability` is softmax over all labels of score / `temperature` (LAVIS's 0.07 by
    default: the checkpoints do not store their learned temperature). With `top_k`, only the `top_k` best
    labels by score are returned. With `rerank=True`, those candidates (all labels without `top_k`) are also
    scored by the ITM head, which reads image and text together: each gets `"match"`, its ITM probability, and
    the list is ordered by it instead; `probability` stays the ITC one.
    """
    if inputs.is_list(image):
        raise InputError(f"classify takes one image, got a list of {len(image)}; call it once per image")
    if isinstance(labels, str):
        raise InputError("labels: give a list of labels, not one string")
    labels = inputs.texts(labels, "labels")
    template = inputs.template(template)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if not temperature > 0:
        raise InputError(f"temperature must be positive, got {temperature!r}")
    _require(pipe, "classify (ITC)", "vision_projection", "embeddings", "text_projection")
    if rerank:
        _require(pipe, "re-rank with ITM", "itm_head")

    image_embeds = _encode(pipe, [image])  # (1, 257, 1408): the image is encoded once
    image_proj = pipe.model.project_images(pipe.model.query(image_embeds))  # (1, Q, 256)
    prompts = [inputs.fill(template, label) for label in labels]
    features, _ = _text_features(pipe, prompts)
    scores = itc_similarity(image_proj, pipe.model.project_texts(features))[0].float()  # (N,)
    probs = (scores / temperature).softmax(dim=0)
    order = scores.argsort(descending=True, stable=True)[:top_k].tolist()
    results = [{"label": labels[i], "score": scores[i].item(), "probability": probs[i].item()} for i in order]
    if rerank:
        multimodal = _multimodal(pipe, image_embeds, [0] * len(order), [prompts[i] for i in order])
        itm = pipe.model.itm_logits(multimodal).float().softmax(dim=-1)[:, 1].tolist()
        for result, p in zip(results, itm):
            result["match"] = p
        results.sort(key=lambda r: r["match"], reverse=True)
    return results


# -- loading --------------------------------------------------------------------------------------------------
def load_retrieval(directory: Path, device: torch.device, dtype: torch.dtype, name: str = "") -> Blip2:
    """Load a retrieval checkpoint directory (Hugging Face layout) as a pipeline object; `blip2.load` does the
    same for any checkpoint."""
    from .files import read_json
    from .loading.loader import is_retrieval, load_directory
    from .pipeline import Blip2

    if not is_retrieval(read_json(directory / "config.json")):
        raise CheckpointError(f"{directory} is not an image-text retrieval checkpoint")
    return Blip2(load_directory(directory, device, dtype, name))


def _encode(pipe: Blip2, images: list) -> Tensor:
    """Images -> vision-tower embeddings (B, 257, 1408), each image decoded and encoded once."""
    return pipe.encode_vision(pipe.preprocess(images))


def _per_image_chunk(pipe: Blip2, images: list, compute: Callable[[Tensor], Tensor]) -> Tensor:
    """`compute` over the vision-tower embeddings of `images`, `pipe.batch_size` images at a time, the
    results concatenated: only one chunk's pixels and (B, 257, 1408) embeddings are in memory at once."""
    size = pipe.batch_size
    return torch.cat([compute(_encode(pipe, images[i : i + size])) for i in range(0, len(images), size)])


def _paired_multimodal(pipe: Blip2, images: list, rows: list[int], texts: list[str]) -> Tensor:
    """Multimodal features (N, Q, 768) of (images[rows[i]], texts[i]) pairs, the images encoded
    `pipe.batch_size` at a time, each once, with the texts of their pairs."""
    parts = []
    for start in range(0, len(images), pipe.batch_size):
        chunk = range(start, min(start + pipe.batch_size, len(images)))
        pairs = [i for i, row in enumerate(rows) if row in chunk]
        local_rows = [rows[i] - start for i in pairs]
        embeds = _encode(pipe, images[chunk.start : chunk.stop])  # (chunk, 257, C)
        parts.append((pairs, _multimodal(pipe, embeds, local_rows, [texts[i] for i in pairs])))
    order = [i for pairs, _ in parts for i in pairs]
    features = torch.cat([f for _, f in parts])
    return features[torch.tensor(order, device=features.device).argsort()]


def _tokenize(pipe: Blip2, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Texts -> ids and mask (N, L) on the device: [CLS] text [SEP], right-padded, truncated to the Q-Former's
    position embeddings."""
    batch = pipe.text.batch(
        texts, padding_side="right", max_length=pipe.config.qformer.max_position_embeddings
    )
    return batch.ids.to(pipe.device), batch.mask.to(pipe.device)


def _text_features(pipe: Blip2, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Texts -> Q-Former text outputs (N, L, 768) and their mask (N, L)."""
    ids, mask = _tokenize(pipe, texts)
    return pipe.model.text_features(ids, mask), mask


def _multimodal(pipe: Blip2, image_embeds: Tensor, rows: list[int], texts: list[str]) -> Tensor:
    """Image embeddings (B, 257, C), and texts each with its image's row -> multimodal features (N, Q, 768)."""
    parts = []
    for start in range(0, len(texts), ITM_BATCH):
        chunk = slice(start, start + ITM_BATCH)
        ids, mask = _tokenize(pipe, texts[chunk])
        index = torch.tensor(rows[chunk], device=image_embeds.device)
        parts.append(pipe.model.multimodal_features(image_embeds.index_select(0, index), ids, mask))
    return torch.cat(parts)


def _out(x: Tensor) -> Tensor:
    return x.float().cpu()


# -- arguments ------------------------------------------------------------------------------------------------
def _require(pipe: Blip2, task: str, *parts: str) -> None:
    """A clear error when the checkpoint lacks what a task needs (captioning checkpoints: any text path)."""
    missing = [p for p in parts if not hasattr(pipe.model, p)]
    if missing:
        raise CheckpointError(
            f"{pipe.name or 'this checkpoint'} cannot {task}: it has no {', '.join(missing)} (a captioning "
            f"checkpoint's Q-Former does not read text); use {RETRIEVAL_CHECKPOINTS}"
        )
