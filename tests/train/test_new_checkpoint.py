"""new_checkpoint: a fresh checkpoint in the Hugging Face layout, initialised as transformers initialises BLIP-2,
that blip2.load and transformers read alike; and stage 2 starting from stage 1's Q-Former (init_from)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import config

import blip2
from blip2.errors import CheckpointError, InputError
from blip2.loading.loader import load_checkpoint
from blip2.testing import TINY_OPT, TINY_QFORMER, TINY_VISION
from blip2.train import new_checkpoint, train

VISION = TINY_VISION
# another Q-Former width than the vision tower's, and cross-attention in every layer
QFORMER = {
    **TINY_QFORMER,
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "cross_attention_frequency": 1,
    "vocab_size": 160,
}
OPT_TEXT = {
    **TINY_OPT,
    "model_type": "opt",
    "max_position_embeddings": 64,
    "vocab_size": 320,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
IMAGE = {"size": {"height": 32, "width": 32}}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, retrieval_checkpoints, checkpoints):
    root = tmp_path_factory.mktemp("fresh")
    retrieval = new_checkpoint(
        root / "retrieval",
        {
            "vision_config": VISION,
            "qformer_config": QFORMER,
            "num_query_tokens": 4,
            "image_text_hidden_size": 16,
        },
        retrieval_checkpoints["plain"],
        IMAGE,
        seed=1,
    )
    captioning = new_checkpoint(
        root / "opt",
        {"vision_config": VISION, "qformer_config": QFORMER, "num_query_tokens": 4, "text_config": OPT_TEXT},
        checkpoints["opt"],
        IMAGE,
    )
    return retrieval, captioning


def test_fresh_weights_are_initialised_as_transformers_does(fresh):
    weights = load_file(str(fresh[1] / "model.safetensors"))
    for key, tensor in weights.items():
        if "norm" in key.lower() and key.endswith("weight"):
            assert torch.all(tensor == 1), key
        elif key.endswith("bias"):
            assert torch.all(tensor == 0), key
        elif tensor.numel() > 500:
            assert abs(float(tensor.std()) - 0.02) < 0.004, key
    assert float(weights["query_tokens"].std()) > 0.01  # normal (LAVIS), not zero: queries must differ
    assert "language_model.lm_head.weight" not in weights  # tied to the embeddings, saved once


def test_fresh_checkpoints_read_alike_in_blip2_and_transformers(fresh):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = Blip2ForConditionalGeneration.from_pretrained(fresh[1], dtype=torch.float32).eval()
    ours = load_checkpoint(fresh[1], device="cpu").model
    with torch.no_grad():
        expected = reference.get_image_features(pixels, return_dict=True).pooler_output
        torch.testing.assert_close(ours.image_prefix(pixels), expected, rtol=1e-5, atol=1e-6)
    reference_itm = Blip2ForImageTextRetrieval.from_pretrained(fresh[0], dtype=torch.float32).eval()
    model = load_checkpoint(fresh[0], device="cpu").model
    with torch.no_grad():
        expected = reference_itm.vision_projection(
            reference_itm.qformer(
                query_embeds=reference_itm.query_tokens.expand(2, -1, -1),
                encoder_hidden_states=reference_itm.vision_model(pixels)[0],
            )[0]
        )
        got = model.vision_projection(model.image_features(pixels))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_new_checkpoint_refuses_a_bad_config(tmp_path, retrieval_checkpoints):
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        new_checkpoint(
            tmp_path / "bad",
            {"vision_config": {**VISION, "num_attention_heads": 5}, "qformer_config": QFORMER},
            retrieval_checkpoints["plain"],
            IMAGE,
        )
    with pytest.raises(InputError, match="image_std"):
        new_checkpoint(
            tmp_path / "bad",
            {"vision_config": VISION, "qformer_config": QFORMER},
            retrieval_checkpoints["plain"],
            {**IMAGE, "image_std": [0.0, 0.5, 0.5]},
        )
    with pytest.raises(InputError, match="tokenizer"):
        new_checkpoint(
            tmp_path / "bad", {"vision_config": VISION, "qformer_config": QFORMER}, tmp_path, IMAGE
        )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("parts", [None, ["vision"]], ids=["vision-and-qformer", "vision-alone"])
def test_stage2_starts_from_stage1s_parts(fresh, caption_folder, tmp_path, parts):
    """The demo's paths: both stages from scratch, stage 2 taking the trained vision tower and Q-Former
    (init_from), or the vision tower alone under its own fresh Q-Former (init_parts: [vision])."""
    stage1 = train(
        config(fresh[0], caption_folder, tmp_path / "s1", 1, trainable=["vision", "qformer", "projections"])
    )
    still = dict(steps=1, lr=0.0, min_lr=0.0, warmup_lr=0.0)  # weights stay as they start
    stage2 = train(
        config(
            fresh[1],
            caption_folder,
            tmp_path / "s2",
            2,
            init_from=str(stage1),
            trainable=["qformer", "projections", "language_model"],
            **({} if parts is None else {"init_parts": parts}),
            **still,
        )
    )
    one, two = load_file(str(stage1 / "model.safetensors")), load_file(str(stage2 / "model.safetensors"))
    start = load_file(str(fresh[1] / "model.safetensors"))
    vision = [k for k in two if k.startswith("vision_model.")]
    qformer = [k for k in two if k.startswith(("qformer.", "query_tokens"))]
    assert vision and all(torch.equal(one[k], two[k]) for k in vision)
    expected = one if parts is None else start
    assert qformer and all(torch.equal(expected[k], two[k]) for k in qformer)
    assert not all(torch.equal(one[k], start[k]) for k in qformer)  # the two differ: the test can fail
    assert isinstance(blip2.load(str(stage2), device="cpu").caption(str(caption_folder / "image0.png")), str)
