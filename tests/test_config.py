"""Our config dataclasses read config.json as transformers does: a missing field means the transformers
class default (config.json is written as a diff against it)."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from blip2.config import Blip2Config, LlamaConfig, OPTConfig, QFormerConfig, T5Config, VisionConfig

PAIRS = [
    (VisionConfig, transformers.Blip2VisionConfig),
    (QFormerConfig, transformers.Blip2QFormerConfig),
    (OPTConfig, transformers.OPTConfig),
    (T5Config, transformers.T5Config),
    (LlamaConfig, transformers.LlamaConfig),
]
# Fields named differently, or derived, on one side.
RENAMED = {"remove_final_layer_norm": "_remove_final_layer_norm"}
DERIVED = {"scale_decoder_outputs", "rope_theta"}  # checked below


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_defaults_equal_transformers(ours, theirs):
    reference = theirs()
    mine = ours.from_dict({})
    for field in dataclasses.fields(ours):
        if field.name in DERIVED or field.name == "tie_word_embeddings" and ours is T5Config:
            continue
        name = RENAMED.get(field.name, field.name)
        if not hasattr(reference, name):  # e.g. T5's decoder_start_token_id lives in generation settings now
            continue
        assert getattr(mine, field.name) == getattr(reference, name), field.name


def test_t5_scaling_follows_the_reference():
    # transformers 5 forces tie_word_embeddings=True on T5 and keeps the old flag's meaning as scaling.
    assert T5Config.from_dict({}).scale_decoder_outputs == transformers.T5Config().scale_decoder_outputs
    flan = {"tie_word_embeddings": False}
    assert (
        T5Config.from_dict(flan).scale_decoder_outputs == transformers.T5Config(**flan).scale_decoder_outputs
    )
    assert (
        T5Config.from_dict(
            {"scale_decoder_outputs": False, "tie_word_embeddings": True}
        ).scale_decoder_outputs
        is False
    )


def test_llama_rope_theta_both_layouts():
    assert LlamaConfig.from_dict({}).rope_theta == transformers.LlamaConfig().rope_parameters["rope_theta"]
    assert LlamaConfig.from_dict({"rope_theta": 5e5}).rope_theta == 5e5
    assert (
        LlamaConfig.from_dict({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}).rope_theta
        == 1e6
    )


def test_blip2_config_from_a_sparse_config_json():
    raw = {
        "model_type": "blip-2",
        "text_config": {"model_type": "opt", "hidden_size": 2560, "num_attention_heads": 32},
        "vision_config": {},
    }
    config = Blip2Config.from_dict(raw)
    reference = transformers.Blip2Config(**{k: v for k, v in raw.items() if k != "model_type"})
    assert config.num_query_tokens == reference.num_query_tokens
    assert (
        config.text.hidden_size == 2560
        and config.text.num_hidden_layers == reference.text_config.num_hidden_layers
    )
    assert config.qformer.encoder_hidden_size == reference.qformer_config.encoder_hidden_size
