"""The retrieval model (ITC, ITM, embeddings) against transformers on the same tiny weights, float32, within 1e-5.

Two checkpoints: one whose config names an image token (the reference then drops the first num_query_tokens
ids, where its processor put placeholders) and one without. Our ids never carry placeholders.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from blip2.config import Blip2Config
from blip2.loading.weights import assign_weights, checkpoint_files, dtype_plan, read_tensors
from blip2.models.retrieval import Blip2ForImageTextRetrieval, similarity
from blip2.text import TextProcessor

VARIANTS = ["plain", "image-token"]
TEXTS = [
    "a cat",
    "two dogs playing with a ball in the park",
    "a man riding a bike down the street next to a bus, and a plate of food with rice",
]
Q = 6  # the tiny checkpoints' query tokens


@pytest.fixture(scope="module")
def loaded(retrieval_checkpoints):
    """(ours, reference, processor, our text processor) per variant, loaded from the same directory."""
    from transformers import Blip2ForImageTextRetrieval as Reference
    from transformers import Blip2Processor

    cache = {}

    def get(variant):
        if variant not in cache:
            path = retrieval_checkpoints[variant]
            config = dataclasses.replace(
                Blip2Config.from_dict(json.loads((path / "config.json").read_text())), text=None
            )
            with torch.device("meta"):
                ours = Blip2ForImageTextRetrieval(config)
            assign_weights(
                ours,
                read_tensors(checkpoint_files(path), torch.device("cpu")),
                dtype_plan(config, torch.float32),
            )
            reference = Reference.from_pretrained(path, dtype=torch.float32).eval()
            cache[variant] = (
                ours.eval(),
                reference,
                Blip2Processor.from_pretrained(path),
                TextProcessor.from_dir(path),
            )
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def images(photos):
    return [Image.open(p).convert("RGB") for p in photos[:3]]


def _inputs(processor, images, texts):
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _our_text(text_processor, texts):
    batch = text_processor.batch(texts, padding_side="right")
    return batch.ids, batch.mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_ids_are_the_processors_without_placeholders(variant, loaded, images):
    ours, _, processor, text = loaded(variant)
    inputs = _inputs(processor, images, TEXTS)
    ids, mask = _our_text(text, TEXTS)
    skip = Q if ours.config.image_token_index is not None else 0
    if skip:
        assert (inputs["input_ids"][:, :Q] == ours.config.image_token_index).all()
    assert torch.equal(inputs["input_ids"][:, skip:], ids)
    assert torch.equal(inputs["attention_mask"][:, skip:], mask)
    assert mask.sum(1).tolist() != [mask.shape[1]] * 3, "the texts should pad"


@pytest.mark.parametrize("variant", VARIANTS)
def test_itc_matches_reference(variant, loaded, images):
    ours, reference, processor, text = loaded(variant)
    inputs = _inputs(processor, images, TEXTS)
    ids, mask = _our_text(text, TEXTS)
    with torch.no_grad():
        expected = reference(**inputs, use_image_text_matching_head=False)
        image_proj = ours.project_images(ours.image_features(inputs["pixel_values"]))
        text_proj = ours.project_texts(ours.text_features(ids, mask))
        got = similarity(image_proj, text_proj)
    assert got.shape == expected.logits_per_image.shape == (3, 3)
    assert (got - expected.logits_per_image).abs().max() < 1e-5
    assert (image_proj - expected.image_embeds).abs().max() < 1e-5
    assert (text_proj - expected.text_embeds).abs().max() < 1e-5
    assert got.max() - got.min() > 0.1, "near-equal similarities: widen the weights"


@pytest.mark.parametrize("variant", VARIANTS)
def test_itm_and_multimodal_features_match_reference(variant, loaded, images):
    ours, reference, processor, text = loaded(variant)
    inputs = _inputs(processor, images, TEXTS)
    ids, mask = _our_text(text, TEXTS)
    with torch.no_grad():
        expected = reference(**inputs, use_image_text_matching_head=True)
        multimodal = ours.multimodal_features(ours.encode_images(inputs["pixel_values"]), ids, mask)
        got = ours.itm_logits(multimodal)
    assert got.shape == expected.logits_per_image.shape == (3, 2)
    assert (got - expected.logits_per_image).abs().max() < 1e-5
    expected_queries = expected.text_model_output.last_hidden_state[:, :Q]
    assert multimodal.shape == (3, Q, 32)
    assert (multimodal - expected_queries).abs().max() < 1e-5


def test_vision_model_with_projection_matches(retrieval_checkpoints, loaded, images):
    from transformers import Blip2VisionModelWithProjection

    ours, _, processor, _ = loaded("plain")
    reference = Blip2VisionModelWithProjection.from_pretrained(
        retrieval_checkpoints["plain"], dtype=torch.float32
    )
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = reference.eval()(pixel_values=pixels).image_embeds
        got = ours.project_images(ours.image_features(pixels))
    assert got.shape == expected.shape == (3, Q, 16)
    assert (got - expected).abs().max() < 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(3, Q))


def test_text_model_with_projection_matches(retrieval_checkpoints, loaded):
    from transformers import Blip2TextModelWithProjection

    ours, _, processor, text = loaded("image-token")
    reference = Blip2TextModelWithProjection.from_pretrained(
        retrieval_checkpoints["image-token"], dtype=torch.float32
    )
    inputs = processor(text=TEXTS, return_tensors="pt", padding=True)  # text only: no placeholders
    ids, mask = _our_text(text, TEXTS)
    assert torch.equal(inputs["input_ids"], ids)
    with torch.no_grad():
        expected = reference.eval()(**inputs)
        features = ours.text_features(ids, mask)
        got = ours.project_texts(features)
    assert features.shape == expected.last_hidden_state.shape
    assert (features - expected.last_hidden_state).abs().max() < 1e-5  # padded positions included
    assert got.shape == (3, 16)
    assert (got - expected.text_embeds[:, 0]).abs().max() < 1e-5


def test_parameter_names_are_the_checkpoints(retrieval_checkpoints, loaded):
    from safetensors import safe_open

    ours, *_ = loaded("plain")
    with safe_open(str(retrieval_checkpoints["plain"] / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert set(ours.state_dict()) == keys
    assert not list(ours.buffers()), "positions are made on the fly, not kept as buffers"
