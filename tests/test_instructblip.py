"""InstructBLIP (the instruction also read by the Q-Former) against transformers, OPT / Flan-T5 / LLaMA."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2.tasks.captioning import make_options

FAMILIES = ["opt", "t5", "llama"]
PROMPTS = ["What is in the picture?", "Describe the image in detail.", "how many dogs are there?"]
OPTIONS = [
    dict(num_beams=1),
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=-1.0, num_return_sequences=2),
    dict(num_beams=1, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=6),
]


@pytest.fixture(scope="module")
def reference(instruct_checkpoints):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    cache = {}

    def get(family):
        if family not in cache:
            path = instruct_checkpoints[family]
            model = InstructBlipForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            processor = InstructBlipProcessor.from_pretrained(path)
            processor.tokenizer.padding_side = "right" if family == "t5" else "left"
            cache[family] = (model, processor, blip2.load(path))
        return cache[family]

    return get


def _inputs(processor, photos):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in photos[: len(PROMPTS)]]
    return processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_query_outputs_read_the_instruction(family, reference, photos):
    hf, processor, ours = reference(family)
    inputs = _inputs(processor, photos)
    with torch.no_grad():
        expected = hf.get_image_features(
            inputs["pixel_values"],
            qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
        ).pooler_output
        got = ours.encode(inputs["pixel_values"], range(3), PROMPTS)
    assert (got - expected).abs().max() < 1e-5
    other = ours.encode(inputs["pixel_values"], range(3), ["something else entirely"] * 3)
    assert (other - got).abs().max() > 1e-3  # the instruction changes what the queries extract


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_token_identical(family, options, reference, photos):
    hf, processor, ours = reference(family)
    inputs = _inputs(processor, photos)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=10, do_sample=False, **options)
        expected = out[:, 1:] if family == "t5" else out[:, inputs["input_ids"].shape[1] :]
        prefix = ours.encode(inputs["pixel_values"], range(3), PROMPTS)
        got = ours.generate_ids(prefix, PROMPTS, make_options(dict(max_new_tokens=10, **options)))
    assert torch.equal(got, expected), f"\nours {got.tolist()}\nhf   {expected.tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_ask_and_caption(family, reference, photos):
    _, _, ours = reference(family)
    assert ours.template == "{}"
    questions = ["What is in the picture?", "how many dogs are there?"]
    answers = ours.ask(photos[0], questions, num_beams=2)
    assert answers == [ours.ask(photos[0], q, num_beams=2) for q in questions]
    caption = ours.caption(photos[0], num_beams=2)
    assert caption == ours.caption(photos[0], prompt="A short image caption:", num_beams=2)
