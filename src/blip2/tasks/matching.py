"""Image-text matching (ITM), contrastive similarity (ITC), embeddings and zero-shot classification.

Each task takes the engine first; `Blip2` exposes them as methods. They need a retrieval checkpoint
(`Salesforce/blip2-itm-vit-g`, `-coco`: Hugging Face's `Blip2ForImageTextRetrieval`), whose Q-Former also
reads text; `embed_images` works on every checkpoint.

Images are decoded and run through the vision tower once per call, however many texts they meet. Texts are
tokenized with the checkpoint's BERT tokenizer ([CLS] text [SEP], right-padded) and truncated to the Q-Former's
`max_position_embeddings` tokens (512 in the released checkpoints), keeping the final [SEP], as the reference
tokenizer does with `truncation=True, max_length=512`. Results are float32 tensors on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from ..errors import CheckpointError, InputError
from ..models.retrieval import Blip2ForImageTextRetrieval
from ..models.retrieval import similarity as itc_similarity
from . import inputs
from .engine import Engine, ImageInput

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
    engine: Engine, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
) -> float | list[float]:
    """The ITM probability of each image-text pair; see `Blip2.match`."""
    _require(engine, "match images and texts (ITM)", "embeddings", "itm_head")
    image_list, text_list = inputs.as_list(images, "images"), inputs.texts(texts)
    rows, text_list = inputs.pairs(len(image_list), text_list)
    multimodal = _paired_multimodal(engine, image_list, rows, text_list)
    probs = _retrieval(engine).itm_logits(multimodal).float().softmax(dim=-1)[:, 1].tolist()
    return probs[0] if not inputs.is_list(images) and not inputs.is_list(texts) else probs


@torch.inference_mode()
def similarity(
    engine: Engine, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
) -> Tensor:
    """The ITC similarity matrix (n_images, n_texts); see `Blip2.similarity`."""
    _require(engine, "compute ITC similarity", "vision_projection", "embeddings", "text_projection")
    image_list, text_list = inputs.as_list(images, "images"), inputs.texts(texts)
    image_proj = _per_image_chunk(
        engine, image_list, lambda embeds: _retrieval(engine).project_images(engine.model.query(embeds))
    )  # (I, Q, 256)
    features, _ = _text_features(engine, text_list)
    text_proj = _retrieval(engine).project_texts(features)  # (T, 256)
    return _out(itc_similarity(image_proj, text_proj))


@torch.inference_mode()
def embed_images(engine: Engine, images: ImageInput | Sequence[ImageInput]) -> dict[str, Tensor]:
    """Image features, one row per image; see `Blip2.embed_images`."""
    features = _per_image_chunk(engine, inputs.as_list(images, "images"), engine.model.query)  # (B, Q, 768)
    out = {"image_embeds": _out(features)}
    if hasattr(engine.model, "vision_projection"):
        out["image_embeds_proj"] = _out(_retrieval(engine).project_images(features))
    return out


@torch.inference_mode()
def embed_texts(engine: Engine, texts: str | Sequence[str]) -> dict[str, Tensor]:
    """Text features from the Q-Former reading the text alone; see `Blip2.embed_texts`."""
    _require(engine, "embed texts", "embeddings", "text_projection")
    features, mask = _text_features(engine, inputs.texts(texts))
    return {
        "text_embeds": _out(features),
        "attention_mask": mask.cpu(),
        "text_embeds_proj": _out(_retrieval(engine).project_texts(features)),
    }


@torch.inference_mode()
def embed_multimodal(
    engine: Engine, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
) -> Tensor:
    """Multimodal features (N, Q, 768) of image-text pairs; see `Blip2.embed_multimodal`."""
    _require(engine, "embed images with texts", "embeddings", "itm_head")
    image_list, text_list = inputs.as_list(images, "images"), inputs.texts(texts)
    rows, text_list = inputs.pairs(len(image_list), text_list)
    return _out(_paired_multimodal(engine, image_list, rows, text_list))


@torch.inference_mode()
def classify(
    engine: Engine,
    image: ImageInput,
    labels: Sequence[str],
    template: str = "a photo of {}",
    rerank: bool = False,
    top_k: int | None = None,
    temperature: float = ITC_TEMPERATURE,
) -> list[dict[str, Any]]:
    """Zero-shot classification of one image among `labels`, best first; see `Blip2.classify`."""
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
    _require(engine, "classify (ITC)", "vision_projection", "embeddings", "text_projection")
    if rerank:
        _require(engine, "re-rank with ITM", "itm_head")

    image_embeds = _encode(engine, [image])  # (1, 257, 1408): the image is encoded once
    image_proj = _retrieval(engine).project_images(engine.model.query(image_embeds))  # (1, Q, 256)
    prompts = [inputs.fill(template, label) for label in labels]
    features, _ = _text_features(engine, prompts)
    scores = itc_similarity(image_proj, _retrieval(engine).project_texts(features))[0].float()  # (N,)
    probs = (scores / temperature).softmax(dim=0)
    order = scores.argsort(descending=True, stable=True)[:top_k].tolist()
    results = [{"label": labels[i], "score": scores[i].item(), "probability": probs[i].item()} for i in order]
    if rerank:
        multimodal = _multimodal(engine, image_embeds, [0] * len(order), [prompts[i] for i in order])
        itm = _retrieval(engine).itm_logits(multimodal).float().softmax(dim=-1)[:, 1].tolist()
        for result, p in zip(results, itm):
            result["match"] = p
        results.sort(key=lambda r: r["match"], reverse=True)
    return results


# -- encoding -------------------------------------------------------------------------------------------------
def _encode(engine: Engine, images: list) -> Tensor:
    """Images -> vision-tower embeddings (B, 257, 1408), each image decoded and encoded once."""
    return engine.encode_vision(engine.preprocess(images))


def _per_image_chunk(engine: Engine, images: list, compute: Callable[[Tensor], Tensor]) -> Tensor:
    """`compute` over the vision-tower embeddings of `images`, `engine.batch_size` images at a time, the
    results concatenated: only one chunk's pixels and (B, 257, 1408) embeddings are in memory at once."""
    size = engine.batch_size
    return torch.cat([compute(_encode(engine, images[i : i + size])) for i in range(0, len(images), size)])


def _paired_multimodal(engine: Engine, images: list, rows: list[int], texts: list[str]) -> Tensor:
    """Multimodal features (N, Q, 768) of (images[rows[i]], texts[i]) pairs, the images encoded
    `engine.batch_size` at a time, each once, with the texts of their pairs."""
    parts = []
    for start in range(0, len(images), engine.batch_size):
        chunk = range(start, min(start + engine.batch_size, len(images)))
        pairs = [i for i, row in enumerate(rows) if row in chunk]
        local_rows = [rows[i] - start for i in pairs]
        embeds = _encode(engine, images[chunk.start : chunk.stop])  # (chunk, 257, C)
        parts.append((pairs, _multimodal(engine, embeds, local_rows, [texts[i] for i in pairs])))
    order = [i for pairs, _ in parts for i in pairs]
    features = torch.cat([f for _, f in parts])
    return features[torch.tensor(order, device=features.device).argsort()]


def _tokenize(engine: Engine, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Texts -> ids and mask (N, L) on the device: [CLS] text [SEP], right-padded, truncated to the Q-Former's
    position embeddings."""
    batch = engine.text.batch(
        texts, padding_side="right", max_length=engine.config.qformer.max_position_embeddings
    )
    return batch.ids.to(engine.device), batch.mask.to(engine.device)


def _text_features(engine: Engine, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Texts -> Q-Former text outputs (N, L, 768) and their mask (N, L)."""
    ids, mask = _tokenize(engine, texts)
    return _retrieval(engine).text_features(ids, mask), mask


def _multimodal(engine: Engine, image_embeds: Tensor, rows: list[int], texts: list[str]) -> Tensor:
    """Image embeddings (B, 257, C), and texts each with its image's row -> multimodal features (N, Q, 768)."""
    parts = []
    for start in range(0, len(texts), ITM_BATCH):
        chunk = slice(start, start + ITM_BATCH)
        ids, mask = _tokenize(engine, texts[chunk])
        index = torch.tensor(rows[chunk], device=image_embeds.device)
        parts.append(_retrieval(engine).multimodal_features(image_embeds.index_select(0, index), ids, mask))
    return torch.cat(parts)


def _out(x: Tensor) -> Tensor:
    return x.float().cpu()


def _retrieval(engine: Engine) -> Blip2ForImageTextRetrieval:
    """The engine's model as a retrieval model: each task first checks with `_require` that it has the parts
    it uses (a captioning checkpoint does not)."""
    return cast(Blip2ForImageTextRetrieval, engine.model)


# -- arguments ------------------------------------------------------------------------------------------------
def _require(engine: Engine, task: str, *parts: str) -> None:
    """A clear error when the checkpoint lacks what a task needs (captioning checkpoints: any text path)."""
    missing = [p for p in parts if not hasattr(engine.model, p)]
    if missing:
        raise CheckpointError(
            f"{engine.name or 'this checkpoint'} cannot {task}: it has no {', '.join(missing)} (a captioning "
            f"checkpoint's Q-Former does not read text); use {RETRIEVAL_CHECKPOINTS}"
        )
