"""Oracle: our stage-2 loss equals transformers' Blip2ForConditionalGeneration(..., labels=...).loss on the tiny
OPT and Flan-T5 checkpoints, the inputs laid out as the HF processor lays them out (the query placeholders
before the text)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from blip2.loading.loader import load_checkpoint
from blip2.models.registry import family
from blip2.train import batches
from blip2.train.data import Row
from blip2.train.objectives import Stage2Objective

ROWS = [
    Row(image=None, caption="a cat sitting on a red couch"),  # type: ignore[arg-type]
    Row(image=None, question="how many dogs are there?", answer="two"),  # type: ignore[arg-type]
    Row(image=None, caption="an airplane flying over the city on a sunny day"),  # type: ignore[arg-type]
]


def layout(ckpt, rows, prompt):
    lm = family(ckpt.config.text)
    make = batches.encoder_decoder_batch if lm.is_encoder_decoder else batches.decoder_only_batch
    return make(rows, ckpt.processors.text, prompt, lm.ask_template, 64)


@pytest.mark.parametrize("name", ["opt", "t5"])
@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_stage2_loss_equals_transformers(checkpoints, oracle, photos, name, prompt):
    path = checkpoints[name]
    reference, processor = oracle(path)
    ckpt = load_checkpoint(path, device="cpu")
    images = [Image.open(p).convert("RGB") for p in photos[:3]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    batch = layout(ckpt, ROWS, prompt)
    q = ckpt.config.num_query_tokens
    placeholders = torch.full((3, q), ckpt.config.image_token_index)
    input_ids = torch.cat([placeholders, batch.ids], dim=1)
    attention_mask = torch.cat([torch.ones(3, q, dtype=torch.long), batch.mask], dim=1)
    if family(ckpt.config.text).is_encoder_decoder:
        labels = batch.labels
    else:
        labels = torch.cat([torch.full((3, q), -100), batch.labels], dim=1)
    with torch.no_grad():
        expected = reference(
            pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask, labels=labels
        ).loss
        objective = Stage2Objective(ckpt.model, family(ckpt.config.text).is_encoder_decoder)
        got = objective(ckpt.model.encode_images(pixels), batch, None)["loss"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_opt_layout_is_lavis_prompt_target_newline(checkpoints, oracle):
    """OPT: '</s>' + caption + '\\n' tokenized as the HF tokenizer does; the loss on everything but the prompt;
    without a prompt '</s>' is a target too (LAVIS masks only the prompt)."""
    _, processor = oracle(checkpoints["opt"])
    ckpt = load_checkpoint(checkpoints["opt"], device="cpu")
    caption = ROWS[0].caption
    batch = layout(ckpt, ROWS[:1], "")
    expected = processor.tokenizer(caption + "\n")["input_ids"]
    assert batch.ids[0].tolist() == expected
    assert batch.labels[0].tolist() == expected
    vqa = layout(ckpt, ROWS[1:2], "")
    prompt_ids = processor.tokenizer("Question: how many dogs are there? Answer:")["input_ids"]
    full = processor.tokenizer("Question: how many dogs are there? Answer: two\n")["input_ids"]
    assert vqa.ids[0].tolist() == full
    assert vqa.labels[0].tolist() == [-100] * len(prompt_ids) + full[len(prompt_ids) :]


def test_t5_layout_is_prompt_to_the_encoder_and_target_to_the_decoder(checkpoints, oracle):
    _, processor = oracle(checkpoints["t5"])
    ckpt = load_checkpoint(checkpoints["t5"], device="cpu")
    batch = layout(ckpt, ROWS[1:2], "")
    assert (
        batch.ids[0].tolist()
        == processor.tokenizer("Question: how many dogs are there? Short answer:")["input_ids"]
    )
    assert batch.labels[0].tolist() == processor.tokenizer("two")["input_ids"]
