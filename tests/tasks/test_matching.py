"""match, similarity, embeddings and classify against transformers' Blip2ForImageTextRetrieval, on tiny
retrieval checkpoints (with and without an image token in the config), and their errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import blip2
from blip2 import CheckpointError, InputError
from blip2.loading.loader import is_retrieval
from blip2.tasks.api import load_retrieval
from blip2.tasks.matching import (
    ITC_TEMPERATURE,
    classify,
    embed_images,
    embed_multimodal,
    embed_texts,
    match,
    similarity,
)

VARIANTS = ["plain", "image-token"]
TEXTS = ["a cat on a red couch", "two dogs", "an airplane flying over the city on a sunny day"]
LABELS = ["cat", "dog", "airplane", "clock tower", "plate of food"]


@pytest.fixture(scope="module")
def paths(retrieval_checkpoints):
    return retrieval_checkpoints


@pytest.fixture(scope="module")
def pipes(paths):
    return {name: load_retrieval(path, torch.device("cpu"), torch.float32) for name, path in paths.items()}


@pytest.fixture(scope="module")
def reference(paths):
    """transformers' model and processor per variant."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    return {
        name: (
            Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32).eval(),
            Blip2Processor.from_pretrained(path),
        )
        for name, path in paths.items()
    }


def _pil(path):
    return Image.open(path).convert("RGB")


def _reference_logits(reference, images, texts, itm: bool) -> torch.Tensor:
    model, processor = reference
    inputs = processor(images=[_pil(p) for p in images], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs, use_image_text_matching_head=itm).logits_per_image


def _itm_probability(reference, images, texts) -> list[float]:
    return _reference_logits(reference, images, texts, itm=True).softmax(-1)[:, 1].tolist()


# -- match --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_match_one_image_many_texts(variant, pipes, reference, photos):
    got = match(pipes[variant], photos[0], TEXTS)
    expected = _itm_probability(reference[variant], [photos[0]] * 3, TEXTS)
    assert got == pytest.approx(expected, abs=1e-5)
    assert isinstance(match(pipes[variant], photos[0], TEXTS[1]), float)
    assert match(pipes[variant], photos[0], TEXTS[1]) == pytest.approx(got[1], abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_match_many_images_one_text_and_pairwise(variant, pipes, reference, photos):
    pipe, images = pipes[variant], photos[:3]
    broadcast = match(pipe, images, TEXTS[0])
    assert broadcast == pytest.approx(_itm_probability(reference[variant], images, [TEXTS[0]] * 3), abs=1e-5)
    pairwise = match(pipe, images, TEXTS)
    assert pairwise == pytest.approx(_itm_probability(reference[variant], images, TEXTS), abs=1e-5)
    assert [match(pipe, i, t) for i, t in zip(images, TEXTS)] == pytest.approx(pairwise, abs=1e-6)
    assert match(pipe, [images[0]], [TEXTS[0]]) == pytest.approx(
        [broadcast[0]], abs=1e-6
    )  # lists in, list out


def test_match_mismatched_lengths_names_both_counts(pipes, photos):
    with pytest.raises(InputError, match="3 images and 2 texts"):
        match(pipes["plain"], photos[:3], TEXTS[:2])


# -- similarity and embeddings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_similarity_is_the_references_itc_logits(variant, pipes, reference, photos):
    got = similarity(pipes[variant], photos[:2], TEXTS)
    expected = _reference_logits(reference[variant], photos[:2], TEXTS, itm=False)  # 2 images x 3 texts
    assert got.shape == expected.shape == (2, 3)
    assert (got - expected).abs().max() < 1e-5


def test_embeddings_shapes_and_agreement_with_similarity(pipes, photos):
    pipe = pipes["plain"]
    images = embed_images(pipe, photos[:2])
    texts = embed_texts(pipe, TEXTS)
    assert images["image_embeds"].shape == (2, 6, 32)
    assert images["image_embeds_proj"].shape == (2, 6, 16)
    assert torch.allclose(images["image_embeds_proj"].norm(dim=-1), torch.ones(2, 6))
    lengths = texts["attention_mask"].sum(1)
    assert texts["text_embeds"].shape == (3, int(lengths.max()), 32)
    assert texts["text_embeds_proj"].shape == (3, 16)
    assert lengths.tolist() != [lengths.max().item()] * 3  # padded
    from_embeddings = (images["image_embeds_proj"] @ texts["text_embeds_proj"].T).amax(dim=1)
    assert torch.allclose(from_embeddings, similarity(pipe, photos[:2], TEXTS), atol=1e-6)
    single = embed_images(pipe, photos[0])["image_embeds"]
    assert single.shape == (1, 6, 32) and torch.allclose(single[0], images["image_embeds"][0], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_embed_multimodal_is_the_references_itm_query_outputs(variant, pipes, reference, photos):
    model, processor = reference[variant]
    inputs = processor(images=[_pil(p) for p in photos[:3]], text=TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs, use_image_text_matching_head=True)
    got = embed_multimodal(pipes[variant], photos[:3], TEXTS)
    assert got.shape == (3, 6, 32)
    assert (got - out.text_model_output.last_hidden_state[:, :6]).abs().max() < 1e-5


# -- classify -----------------------------------------------------------------------------------------------------
def test_classify_ranks_by_itc_and_softmaxes_with_the_temperature(pipes, photos):
    pipe = pipes["plain"]
    results = classify(pipe, photos[1], LABELS)
    scores = similarity(pipe, photos[1], [f"a photo of {label}" for label in LABELS])[0]
    expected_order = [LABELS[i] for i in scores.argsort(descending=True).tolist()]
    assert [r["label"] for r in results] == expected_order
    probs = (scores / ITC_TEMPERATURE).softmax(0)
    for r in results:
        i = LABELS.index(r["label"])
        assert r["score"] == pytest.approx(scores[i].item(), abs=1e-6)
        assert r["probability"] == pytest.approx(probs[i].item(), abs=1e-6)
    assert sum(r["probability"] for r in results) == pytest.approx(1.0, abs=1e-5)
    top = classify(pipe, photos[1], LABELS, top_k=2, template="{}, a picture", temperature=1.0)
    assert len(top) == 2 and all(set(r) == {"label", "score", "probability"} for r in top)


def test_classify_rerank_orders_candidates_by_itm(pipes, photos):
    pipe = pipes["image-token"]
    itc = classify(pipe, photos[0], LABELS, top_k=3)
    reranked = classify(pipe, photos[0], LABELS, top_k=3, rerank=True)
    assert {r["label"] for r in reranked} == {r["label"] for r in itc}
    expected = match(pipe, photos[0], [f"a photo of {r['label']}" for r in reranked])
    assert [r["match"] for r in reranked] == pytest.approx(expected, abs=1e-6)
    assert [r["match"] for r in reranked] == sorted((r["match"] for r in reranked), reverse=True)


def test_float16_follows_the_references_dtypes(paths, photos):
    """Float16 as the reference: Q-Former and query tokens in float32, the rest in float16 (so the queries
    are rounded to float16 where they join the text for ITM)."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    pipe = load_retrieval(paths["image-token"], torch.device("cpu"), torch.float16)
    model = Blip2ForImageTextRetrieval.from_pretrained(paths["image-token"], dtype=torch.float16).eval()
    processor = Blip2Processor.from_pretrained(paths["image-token"])
    images = [_pil(p) for p in photos[:2]]
    inputs = processor(images=images, text=TEXTS[:2], return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].half()
    with torch.no_grad():
        itm = model(**inputs, use_image_text_matching_head=True).logits_per_image.float().softmax(-1)[:, 1]
        itc = model(**inputs).logits_per_image.float()
    assert match(pipe, photos[:2], TEXTS[:2]) == pytest.approx(itm.tolist(), abs=1e-3)
    assert (similarity(pipe, photos[:2], TEXTS[:2]) - itc).abs().max() < 1e-3


# -- text length --------------------------------------------------------------------------------------------------
def test_long_text_is_truncated_to_the_qformer_positions(pipes, reference, photos):
    pipe = pipes["plain"]
    limit = pipe.config.qformer.max_position_embeddings  # 64 in the tiny checkpoints
    long_text = " ".join(["a cat sitting on a red couch"] * 20)
    _, processor = reference["plain"]
    expected_ids = processor.tokenizer(long_text, truncation=True, max_length=limit)["input_ids"]
    ids = pipe.text.batch([long_text], padding_side="right", max_length=limit).ids[0].tolist()
    assert ids == expected_ids and len(ids) == limit and ids[-1] == processor.tokenizer.sep_token_id
    assert embed_texts(pipe, [long_text, "a cat"])["text_embeds"].shape == (2, limit, 32)
    model, _ = reference["plain"]
    pixels = processor(images=[_pil(photos[0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = (
            model(
                pixel_values=pixels,
                input_ids=torch.tensor([expected_ids]),
                attention_mask=torch.ones(1, limit, dtype=torch.long),
                use_image_text_matching_head=True,
            )
            .logits_per_image.softmax(-1)[0, 1]
            .item()
        )
    assert match(pipe, photos[0], long_text) == pytest.approx(expected, abs=1e-5)


# -- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, img: match(p, [], "a cat"), "images: the list is empty"),
        (lambda p, img: match(p, img, []), "texts: the list is empty"),
        (lambda p, img: match(p, img, ""), "non-empty strings"),
        (lambda p, img: similarity(p, img, ["a cat", "  "]), "non-empty strings"),
        (lambda p, img: embed_texts(p, [None]), "non-empty strings"),
        (lambda p, img: embed_images(p, []), "images: the list is empty"),
        (lambda p, img: embed_multimodal(p, [img, img], ["a", "b", "c"]), "2 images and 3 texts"),
        (lambda p, img: classify(p, [img, img], LABELS), "one image"),
        (lambda p, img: classify(p, img, []), "labels: the list is empty"),
        (lambda p, img: classify(p, img, "cat"), "a list of labels"),
        (lambda p, img: classify(p, img, ["cat", ""]), "labels must be non-empty"),
        (lambda p, img: classify(p, img, LABELS, template="a photo"), "no '{}'"),
        (lambda p, img: classify(p, img, LABELS, template="{0}"), "no '{}'"),
        (lambda p, img: classify(p, img, LABELS, template=3), "template must be a string"),
        (lambda p, img: classify(p, img, None), "labels must be non-empty strings"),
        (lambda p, img: classify(p, img, ["cat", "\udcff"]), "labels: .* lone surrogate"),
        (lambda p, img: classify(p, img, LABELS, template="a {} \udcff"), "template: .* lone surrogate"),
        (lambda p, img: match(p, img, "caf\udce9"), "texts: .* at position 3 is a lone surrogate"),
        (lambda p, img: similarity(p, img, [5]), "non-empty strings"),
        (lambda p, img: embed_texts(p, ["ok", "\ud800"]), "lone surrogate"),
        (lambda p, img: classify(p, img, LABELS, top_k=0), "top_k"),
        (lambda p, img: classify(p, img, LABELS, temperature=0), "temperature"),
    ],
)
def test_bad_input_is_a_clear_error(call, message, pipes, photos):
    with pytest.raises(InputError, match=message):
        call(pipes["plain"], photos[0])


def test_classify_template_rule(pipes, photos):
    """The first {} takes the label; other braces stay as written (str.format would fail on them)."""
    pipe = pipes["plain"]
    got = classify(pipe, photos[0], LABELS[:2], template="{a} photo of {} {}")
    texts = ["{a} photo of cat {}", "{a} photo of dog {}"]
    expected = similarity(pipe, photos[0], texts)[0]
    assert [r["score"] for r in got] == sorted(expected.tolist(), reverse=True)
    assert {r["label"] for r in got} == {"cat", "dog"}


@pytest.mark.parametrize("name", ["match", "embed_multimodal", "similarity", "embed_images"])
def test_images_are_encoded_batch_size_at_a_time(name, paths, photos, monkeypatch):
    """A long list of images never goes through the vision tower at once; the output does not change."""
    pipe = load_retrieval(paths["plain"], torch.device("cpu"), torch.float32)
    images, texts = photos[:5], ["a cat", "two dogs", "a rocket", "coffee", "noise"]
    task = getattr(blip2.tasks.matching, name)
    call = (lambda: task(pipe, images)) if name == "embed_images" else (lambda: task(pipe, images, texts))
    whole = call()
    calls = []
    original = pipe.model.vision_model.forward
    monkeypatch.setattr(pipe.model.vision_model, "forward", lambda x: calls.append(len(x)) or original(x))
    pipe.batch_size = 2
    chunked = call()
    assert calls == [2, 2, 1]
    if name == "embed_images":
        assert whole.keys() == chunked.keys()
        whole, chunked = torch.cat(list(whole.values()), -1), torch.cat(list(chunked.values()), -1)
    assert torch.allclose(torch.as_tensor(whole), torch.as_tensor(chunked), atol=1e-6, rtol=0)


def test_one_image_many_texts_in_chunks(paths, photos):
    pipe = load_retrieval(paths["plain"], torch.device("cpu"), torch.float32)
    whole = match(pipe, photos[0], TEXTS)
    pipe.batch_size = 1
    assert match(pipe, photos[0], TEXTS) == pytest.approx(whole, abs=1e-6)


def test_bad_image_names_the_file(pipes, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(blip2.ImageError, match="missing.jpg"):
        match(pipes["plain"], missing, "a cat")


# -- captioning checkpoints ---------------------------------------------------------------------------------------
def test_captioning_checkpoint_embeds_images_but_not_texts(checkpoints, oracle, photos):
    pipe = blip2.load(checkpoints["opt"], device="cpu", dtype="float32")
    got = embed_images(pipe, photos[:2])
    assert set(got) == {"image_embeds"}  # no vision projection in a captioning checkpoint
    hf, processor = oracle(checkpoints["opt"])
    pixels = processor(images=[_pil(p) for p in photos[:2]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = hf.vision_model(pixels).last_hidden_state
        expected = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=image)
    assert (got["image_embeds"] - expected.last_hidden_state).abs().max() < 1e-5
    for task in (
        lambda: embed_texts(pipe, "a cat"),
        lambda: match(pipe, photos[0], "a cat"),
        lambda: similarity(pipe, photos[0], "a cat"),
        lambda: classify(pipe, photos[0], LABELS),
    ):
        with pytest.raises(CheckpointError, match="retrieval checkpoint such as Salesforce/blip2-itm-vit-g"):
            task()


def test_is_retrieval(paths, checkpoints):
    import json

    assert is_retrieval(json.loads((paths["plain"] / "config.json").read_text()))
    assert not is_retrieval(json.loads((checkpoints["opt"] / "config.json").read_text()))
    assert not is_retrieval({})
