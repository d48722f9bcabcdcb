"""The config files of the released checkpoints, imitated by blip2.testing: 2023 uploads (complete configs,
preprocessor_config.json, no image token), the Nov 2024 rewrite by transformers 4.47 (diff configs,
processor_config.json with num_query_tokens, the vocabulary padded past <image>), Flan-T5's exact GELU and
instructblip-vicuna's token ids. Each loads and gives transformers' tokens on the same files."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import blip2
from blip2.config import read_config
from blip2.tasks.captioning import make_options
from blip2.testing import (
    ERAS,
    VICUNA_GENERATION_IDS,
    build_checkpoint,
    build_instructblip_checkpoint,
)

PROMPTS = ["", "a photo of", "Question: how many dogs are there? Answer:"]
INSTRUCTIONS = ["What is in the picture?", "Describe the image in detail.", "how many dogs are there?"]
# Options whose tokens do not depend on what the history holds before the text (the 2023 files have no image
# placeholders there, the oracle's fix-up below puts them in: the penalties would see them).
OPTIONS = [
    dict(num_beams=1),
    dict(num_beams=3, length_penalty=-1.0),
    dict(num_beams=4, num_return_sequences=2),
]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    paths = {}
    for era in ERAS:
        for family in ("opt", "t5"):
            paths[f"blip2-{family}-{era}"] = build_checkpoint(root / f"{family}-{era}", family, era=era)
        paths[f"instructblip-llama-{era}"] = build_instructblip_checkpoint(
            root / f"vicuna-{era}", "llama", vicuna_ids=True, era=era
        )
    return paths


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
    """instructblip-vicuna's ids, files as transformers 5.24 writes them."""
    return build_instructblip_checkpoint(
        tmp_path_factory.mktemp("vicuna") / "vicuna", "llama", vicuna_ids=True
    )


@functools.cache
def load_as_wired(path):
    """blip2.load, with the config that loading.loader.load_directory reads once config.read_config is wired in."""
    pipe = blip2.load(path, device="cpu", dtype="float32")
    pipe.config = read_config(path)[0]
    return pipe


@functools.cache
def oracle_for(path, instruct: bool):
    """transformers' model and processor on the same files. Files without an image token (2023) get the
    fix-up transformers asks for (its generate no longer concatenates the image prefix itself): the
    processor's num_query_tokens and the config's image_token_index."""
    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2Processor,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    model_class = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    processor_class = InstructBlipProcessor if instruct else Blip2Processor
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    processor = processor_class.from_pretrained(path)
    if model.config.image_token_index is None:
        model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
        processor.num_query_tokens = model.config.num_query_tokens
    encoder_decoder = model.config.text_config.model_type == "t5"
    processor.tokenizer.padding_side = "right" if encoder_decoder else "left"
    return model, processor


def reference_tokens(model, inputs, **options):
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=10, **options)
    if model.config.text_config.model_type == "t5":
        return out[:, 1:]
    return out[:, inputs["input_ids"].shape[1] :]


def our_tokens(pipe, pixels, prompts, **options):
    prefix = pipe.encode(pixels, range(len(prompts)), prompts)
    return pipe.generate_ids(prefix, prompts, make_options(dict(max_new_tokens=10, **options)))


def _images(photos, n):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in photos[:n]]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", [f"blip2-{f}-{e}" for e in ERAS for f in ("opt", "t5")])
def test_blip2_release_files_token_identical(name, options, released, photos):
    path = released[name]
    model, processor = oracle_for(path, instruct=False)
    inputs = processor(images=_images(photos, 3), text=PROMPTS, return_tensors="pt", padding=True)
    expected = reference_tokens(model, inputs, **options)
    ours = load_as_wired(path)
    got = our_tokens(ours, inputs["pixel_values"], PROMPTS, **options)
    assert torch.equal(got, expected), f"\nours {got.tolist()}\nhf   {expected.tolist()}"


@pytest.mark.parametrize("name", [f"blip2-{f}-{e}" for e in ERAS for f in ("opt", "t5")])
def test_blip2_release_files_logits_match(name, released, photos):
    """Logits within 1e-5 (tokens alone would not see Flan-T5's GELU variant on these tiny models)."""
    path = released[name]
    model, processor = oracle_for(path, instruct=False)
    inputs = processor(images=_images(photos, 3), text=PROMPTS, return_tensors="pt", padding=True)
    ours = load_as_wired(path)
    with torch.no_grad():
        kwargs = {"decoder_input_ids": torch.zeros(3, 1, dtype=torch.long)} if "t5" in name else {}
        expected = model(**inputs, **kwargs).logits[:, -1]
        stepper, _, _ = ours.stepper(ours.encode(inputs["pixel_values"]), PROMPTS)
        got = stepper.prefill()
    assert expected.std() > 1.0
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("era", ERAS)
def test_release_files_read_as_written(era, released):
    config, raw = read_config(released[f"blip2-opt-{era}"])
    assert raw["transformers_version"].startswith("4.")
    if era == "2024":
        # the <image> token right after the tokenizer's vocabulary, the vocabulary padded to 64 (50265 / 50304)
        assert config.text.vocab_size % 64 == 0 and config.image_token_index < config.text.vocab_size
        assert "vocab_size" in raw["text_config"] and "do_layer_norm_before" not in raw["text_config"]
        assert json.loads((released[f"blip2-opt-{era}"] / "processor_config.json").read_text()) == {
            "num_query_tokens": config.num_query_tokens,
            "processor_class": "Blip2Processor",
        }
    else:
        assert config.image_token_index is None
        assert raw["use_decoder_only_language_model"] is True and "do_layer_norm_before" in raw["text_config"]
        assert raw["text_config"]["num_beams"] == 1  # the 4.2x generation fields, ignored
        assert not (released[f"blip2-opt-{era}"] / "processor_config.json").exists()
    t5, _ = read_config(released[f"blip2-t5-{era}"])
    assert (t5.text.dense_act_fn, t5.text.is_gated_act) == ("gelu", True)


@pytest.mark.parametrize("options", OPTIONS[:2], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("era", ERAS)
def test_instructblip_vicuna_release_files(era, options, released, photos):
    """With generation_config.json's ids (eos 2, pad 0), as transformers generates when given them."""
    path = released[f"instructblip-llama-{era}"]
    model, processor = oracle_for(path, instruct=True)
    inputs = processor(images=_images(photos, 3), text=INSTRUCTIONS, return_tensors="pt", padding=True)
    ids = {k: VICUNA_GENERATION_IDS[k] for k in ("eos_token_id", "pad_token_id")}
    expected = reference_tokens(model, inputs, **ids, **options)
    ours = load_as_wired(path)
    got = our_tokens(ours, inputs["pixel_values"], INSTRUCTIONS, **options)
    assert torch.equal(got, expected), f"\nours {got.tolist()}\nhf   {expected.tolist()}"


# -- instructblip-vicuna's ids ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vicuna_case(vicuna, photos):
    model, processor = oracle_for(vicuna, instruct=True)
    inputs = processor(images=_images(photos, 3), text=INSTRUCTIONS, return_tensors="pt", padding=True)
    return model, inputs


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vicuna_stops_at_its_tokenizers_eos(num_beams, vicuna, vicuna_case):
    model, inputs = vicuna_case
    ours = load_as_wired(vicuna)
    assert (ours.config.text.eos_token_id, ours.config.text.pad_token_id) == (2, 0)
    got = our_tokens(ours, inputs["pixel_values"], INSTRUCTIONS, num_beams=num_beams)
    expected = reference_tokens(model, inputs, eos_token_id=2, pad_token_id=0, num_beams=num_beams)
    assert torch.equal(got, expected), f"\nours {got.tolist()}\nhf   {expected.tolist()}"
    rows = got.tolist()
    # the fixture makes both ends likely: a row ends early at </s> (2), and <s> (1, text_config's eos) does not
    # end one
    assert any(2 in row[:-1] for row in rows)
    assert any(1 in row[: row.index(2) if 2 in row else len(row)] for row in rows)


def test_vicuna_text_config_ids_alone(vicuna, vicuna_case):
    """Without generation_config.json's ids, as transformers' own generate (it does not apply them to the
    language model): eos 1, and pad -1 read as none. transformers then crashes on a batch with an early row
    (embedding(-1)); blip2 fills finished rows with EOS, as transformers does when there is no pad id."""
    model, inputs = vicuna_case
    ours = blip2.load(vicuna, device="cpu", dtype="float32")
    ours.config = read_config(vicuna)[0]
    ours.config.text.eos_token_id, ours.config.text.pad_token_id = (
        1,
        None,
    )  # the text_config's, pad -1 dropped
    got = our_tokens(ours, inputs["pixel_values"], INSTRUCTIONS, num_beams=1)
    with pytest.raises(IndexError):
        reference_tokens(model, inputs, num_beams=1)
    for row in range(len(INSTRUCTIONS)):  # one row at a time, transformers does not crash
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        expected = reference_tokens(model, single, num_beams=1)[0].tolist()
        assert got[row, : len(expected)].tolist() == expected
        assert set(got[row, len(expected) :].tolist()) <= {1}
    beams = our_tokens(ours, inputs["pixel_values"], INSTRUCTIONS, num_beams=3)
    expected = reference_tokens(model, inputs, num_beams=3)
    filled = expected == -1  # transformers' beam search pads with the config's -1 where blip2 puts EOS
    assert filled.any()
    assert torch.equal(beams[~filled], expected[~filled]) and bool((beams[filled] == 1).all())
