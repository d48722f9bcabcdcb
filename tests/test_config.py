"""Our config dataclasses read config.json as transformers does: a missing field means the transformers
class default (config.json is written as a diff against it)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from blip2.config import (
    Blip2Config,
    LlamaConfig,
    OPTConfig,
    QFormerConfig,
    T5Config,
    VisionConfig,
    apply_generation_config,
    read_config,
)
from blip2.errors import CheckpointError
from blip2.files import MAX_JSON_BYTES
from blip2.testing import VICUNA_GENERATION_IDS, VICUNA_TEXT_IDS

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


# -- Flan-T5's activation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"feed_forward_proj": "gated-gelu"},
        {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"},  # every released Flan-T5 BLIP-2 config
        {"feed_forward_proj": "relu", "dense_act_fn": "gelu"},
        {"feed_forward_proj": "gated-silu"},
        {"feed_forward_proj": "gated-gelu", "is_gated_act": False},
        {"dense_act_fn": "gelu_new"},
    ],
    ids=str,
)
def test_t5_activation_resolved_as_transformers(fields):
    ours, theirs = T5Config.from_dict(fields), transformers.T5Config(**fields)
    assert (ours.dense_act_fn, ours.is_gated_act) == (theirs.dense_act_fn, theirs.is_gated_act)


def test_activation_names_are_those_the_models_implement():
    from blip2.config import ACTIVATION_NAMES
    from blip2.models.layers import ACTIVATIONS

    assert set(ACTIVATIONS) == ACTIVATION_NAMES


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"dense_act_fn": "gelu_fancy"}, "dense_act_fn"),
        ({"feed_forward_proj": "gated-swish2"}, "feed_forward_proj"),
        ({"feed_forward_proj": "double-gated-gelu"}, "feed_forward_proj"),
        ({"feed_forward_proj": 3}, "feed_forward_proj"),
    ],
)
def test_unknown_t5_activation_is_a_checkpoint_error(fields, field):
    with pytest.raises(CheckpointError, match=rf"config.json: text_config.{field} = "):
        Blip2Config.from_dict({"text_config": {"model_type": "t5", **fields}})


# -- bounds ---------------------------------------------------------------------------------------------------------
def _with(path: str, value):
    """A sparse, valid config.json with `value` put at the dotted `path`."""
    raw = {
        "model_type": "blip-2",
        "text_config": {"model_type": "opt"},
        "vision_config": {},
        "qformer_config": {},
    }
    *parents, name = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[name] = value
    return raw


BAD_VALUES = [
    ("vision_config.num_hidden_layers", 10**6, "outside"),
    ("vision_config.num_hidden_layers", 0, "outside"),
    ("vision_config.num_hidden_layers", 2.0, "not an integer"),
    ("vision_config.num_hidden_layers", True, "not an integer"),
    ("vision_config.num_hidden_layers", "39", "not an integer"),
    ("vision_config.num_attention_heads", 0, "outside"),
    ("vision_config.num_attention_heads", 15, "does not divide hidden_size"),
    ("vision_config.hidden_size", 65537, "outside"),
    ("vision_config.patch_size", 15, "does not divide image_size"),
    ("vision_config.patch_size", 448, "does not divide image_size"),
    ("vision_config.image_size", 10**5, "outside"),
    ("vision_config.layer_norm_eps", 0, "not a finite number"),
    ("vision_config.layer_norm_eps", float("nan"), "not a finite number"),
    ("vision_config.layer_norm_eps", "1e-6", "not a number"),
    ("vision_config.hidden_act", "gelu_fancy", "not a supported activation"),
    ("vision_config.qkv_bias", "yes", "not true or false"),
    ("qformer_config.cross_attention_frequency", 0, "outside"),
    ("qformer_config.num_attention_heads", 7, "does not divide hidden_size"),
    ("qformer_config.vocab_size", 10**8, "outside"),
    ("qformer_config.pad_token_id", 30522, "not a token of the vocabulary"),
    ("qformer_config.max_position_embeddings", -1, "outside"),
    ("text_config.num_hidden_layers", 1001, "outside"),
    ("text_config.num_attention_heads", 0, "outside"),
    ("text_config.vocab_size", 0, "outside"),
    ("text_config.activation_function", "swish", "not a supported activation"),
    ("text_config.eos_token_id", 50272, "not a token of the vocabulary"),
    ("text_config.eos_token_id", -1, "not a token of the vocabulary"),
    ("text_config.eos_token_id", [], "not a token id"),
    ("text_config.eos_token_id", "</s>", "not a token id"),
    ("text_config.pad_token_id", 1.0, "not a token id"),
    ("text_config._remove_final_layer_norm", "no", "not true or false"),
    ("num_query_tokens", 0, "outside"),
    ("num_query_tokens", 1025, "outside"),
    ("image_text_hidden_size", -5, "outside"),
    ("image_token_index", 50272, "out of vocab"),
    ("image_token_index", "50265", "not a token id"),
    ("image_token_id", -1, "out of vocab"),
]


@pytest.mark.parametrize("path, value, problem", BAD_VALUES, ids=lambda v: str(v)[:30])
def test_out_of_bounds_values_name_file_field_and_value(path, value, problem):
    with pytest.raises(CheckpointError) as info:
        Blip2Config.from_dict(_with(path, value))
    message = str(info.value)
    assert message.startswith(f"config.json: {path} = {value!r} "), message
    assert problem in message


@pytest.mark.parametrize(
    "path, value, problem",
    [
        ("text_config.num_layers", 0, "outside"),
        ("text_config.relative_attention_num_buckets", 2, "outside"),
        ("text_config.relative_attention_max_distance", 16, "not above half"),
        ("text_config.decoder_start_token_id", 32128, "not a token of the vocabulary"),
        ("text_config.layer_norm_epsilon", float("inf"), "not a finite number"),
    ],
)
def test_t5_bounds(path, value, problem):
    raw = _with(path, value)
    raw["text_config"]["model_type"] = "t5"
    with pytest.raises(CheckpointError, match=rf"^config.json: {path} = .*{problem}"):
        Blip2Config.from_dict(raw)


@pytest.mark.parametrize(
    "fields, field, problem",
    [
        ({"num_attention_heads": 0}, "num_attention_heads", "outside"),
        ({"num_attention_heads": 32, "num_key_value_heads": 5}, "num_key_value_heads", "does not divide"),
        ({"hidden_size": 36, "num_attention_heads": 4}, "head_dim", "is not even"),
        ({"rope_theta": -1.0}, "rope_theta", "not a finite number"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.rope_type", "not supported"),
        ({"rms_norm_eps": None, "rope_parameters": "default"}, "rope_parameters", "not a JSON object"),
    ],
)
def test_llama_bounds(fields, field, problem):
    with pytest.raises(CheckpointError, match=rf"^config.json: text_config.{field}.*{problem}"):
        Blip2Config.from_dict({"text_config": {"model_type": "llama", **fields}})


@pytest.mark.parametrize("ours", [VisionConfig, QFormerConfig, OPTConfig, T5Config, LlamaConfig])
def test_every_field_read_has_a_rule(ours):
    from blip2.config import FIELD_RULES

    checked_elsewhere = {"feed_forward_proj"}  # T5Config.from_dict parses it
    keys = {RENAMED.get(f.name, f.name) for f in dataclasses.fields(ours)} - checked_elsewhere
    assert keys <= set(FIELD_RULES), keys - set(FIELD_RULES)


def test_a_million_layers_fail_before_anything_is_built():
    import time

    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="vision_config.num_hidden_layers = 1000000"):
        Blip2Config.from_dict(_with("vision_config.num_hidden_layers", 10**6))
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("raw", [[], "blip-2", None, 3])
def test_config_json_not_an_object(raw):
    with pytest.raises(CheckpointError, match="config.json is not a JSON object"):
        Blip2Config.from_dict(raw)


@pytest.mark.parametrize("key", ["vision_config", "qformer_config", "text_config"])
@pytest.mark.parametrize("value", [[1, 2], "opt", 7])
def test_sub_configs_not_objects(key, value):
    with pytest.raises(CheckpointError, match=f"config.json: {key} is not a JSON object"):
        Blip2Config.from_dict({key: value})


@pytest.mark.parametrize("model_type", [["t5"], {"a": 1}, "gpt2"])
def test_text_model_type_checked(model_type):
    with pytest.raises(CheckpointError, match="text_config.model_type .* is not supported"):
        Blip2Config.from_dict({"text_config": {"model_type": model_type}})


def test_retrieval_image_token_is_not_a_language_model_token():
    # blip2-itm-vit-g has no text_config: its <image> comes after BERT's vocabulary and is never embedded
    config = Blip2Config.from_dict({"qformer_config": {"vocab_size": 30523}, "image_token_index": 30523})
    assert config.text is None and config.image_token_index == 30523


def test_long_values_are_shortened_in_messages():
    with pytest.raises(CheckpointError) as info:
        Blip2Config.from_dict(_with("vision_config.hidden_act", "x" * 100_000))
    assert len(str(info.value)) < 300


def test_released_values_pass():
    """The values of the released configs (blip2-opt-2.7b, blip2-flan-t5-xl, instructblip-vicuna-7b)."""
    vision = {"hidden_size": 1408, "num_hidden_layers": 39, "num_attention_heads": 16, "image_size": 224}
    opt = {"model_type": "opt", "hidden_size": 2560, "num_attention_heads": 32, "num_hidden_layers": 32}
    opt.update(vocab_size=50304, ffn_dim=10240, word_embed_proj_dim=2560, eos_token_id=50118, pad_token_id=1)
    t5 = {"model_type": "t5", "d_model": 2048, "d_kv": 64, "d_ff": 5120, "num_heads": 32, "num_layers": 24}
    t5.update(feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False)
    llama = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 32001}
    llama.update(bos_token_id=0, eos_token_id=1, pad_token_id=-1, rope_scaling=None)
    for text in (opt, t5, llama):
        raw = {
            "vision_config": vision,
            "text_config": text,
            "image_token_index": 32000,
            "num_query_tokens": 32,
        }
        config = Blip2Config.from_dict(raw)
        assert config.vision.num_hidden_layers == 39 and config.image_token_index == 32000
    assert Blip2Config.from_dict({"text_config": t5}).text.dense_act_fn == "gelu"


# -- token ids ------------------------------------------------------------------------------------------------------
def test_vicuna_pad_minus_one_means_no_pad():
    config = LlamaConfig.from_dict(
        {"vocab_size": 32001, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1}
    )
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, None)
    assert OPTConfig.from_dict({"pad_token_id": 50272, "bos_token_id": -3}).pad_token_id is None
    assert OPTConfig.from_dict({"eos_token_id": [2, 50118]}).eos_token_id == [2, 50118]


def test_generation_config_ids_replace_the_text_configs():
    raw = {"text_config": {"model_type": "llama", "vocab_size": 32001, **VICUNA_TEXT_IDS}}
    config = apply_generation_config(Blip2Config.from_dict(raw), {"eos_token_id": 2, "pad_token_id": 0})
    assert (config.text.bos_token_id, config.text.eos_token_id, config.text.pad_token_id) == (0, 2, 0)
    # sampling settings there are not read: only token ids
    same = apply_generation_config(config, {"num_beams": 4, "max_length": 5, "do_sample": True})
    assert same == config
    # null: no pad id (EOS fills); eos cannot be none, so null keeps it
    cleared = apply_generation_config(config, {"pad_token_id": None, "eos_token_id": None})
    assert (cleared.text.pad_token_id, cleared.text.eos_token_id) == (None, 2)
    # pad ids outside the vocabulary read as none, as in config.json
    assert apply_generation_config(config, {"pad_token_id": -1}).text.pad_token_id is None


def test_generation_config_decoder_start_for_t5_only():
    t5 = Blip2Config.from_dict({"text_config": {"model_type": "t5"}})
    assert apply_generation_config(t5, {"decoder_start_token_id": 5}).text.decoder_start_token_id == 5
    opt = Blip2Config.from_dict({"text_config": {}})
    assert apply_generation_config(opt, {"decoder_start_token_id": 5}) == opt
    retrieval = dataclasses.replace(opt, text=None)
    assert apply_generation_config(retrieval, {"eos_token_id": 3}) is retrieval


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"eos_token_id": 50272},
            "generation_config.json: eos_token_id = 50272 is not a token of the vocabulary",
        ),
        ({"eos_token_id": [2, -1]}, r"generation_config.json: eos_token_id = \[2, -1\] is not a token"),
        ({"eos_token_id": "2"}, "generation_config.json: eos_token_id = '2' is not a token id"),
        ({"pad_token_id": 0.5}, "generation_config.json: pad_token_id = 0.5 is not a token id"),
        ({"bos_token_id": [1, 2]}, "generation_config.json: bos_token_id = .* is not a token id"),
        ([2], "generation_config.json is not a JSON object"),
    ],
)
def test_generation_config_bad_ids(data, match):
    with pytest.raises(CheckpointError, match=match):
        apply_generation_config(Blip2Config.from_dict({"text_config": {}}), data)


# -- files ----------------------------------------------------------------------------------------------------------
def test_read_config_applies_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["X"], "text_config": {"model_type": "llama", **VICUNA_TEXT_IDS}})
    )
    config, raw = read_config(tmp_path)
    assert raw["architectures"] == ["X"]
    assert (config.text.eos_token_id, config.text.pad_token_id) == (1, None)
    (tmp_path / "generation_config.json").write_text(json.dumps(VICUNA_GENERATION_IDS))
    config, _ = read_config(tmp_path)
    assert (config.text.bos_token_id, config.text.eos_token_id, config.text.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", "config.json: not valid JSON"),
        (b"[1, 2]", "config.json: not a JSON object .got list"),
        (b'"blip-2"', "config.json: not a JSON object .got str"),
        (b"null", "config.json: not a JSON object .got NoneType"),
        (b"\xff\xfe{}", "config.json: not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "config.json: not valid JSON"),  # nests past the recursion limit
        (b'{"a": 1' + b"0" * 5000 + b"}", "config.json: not valid JSON"),  # past int's digit limit
        (b" " * (MAX_JSON_BYTES + 1) + b"{}", "config.json: larger than"),
    ],
    ids=["syntax", "list", "string", "null", "not-utf8", "deep", "long-int", "huge"],
)
def test_read_json_refuses_hostile_files(tmp_path, content, match):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_config(tmp_path)


def test_read_json_missing_or_not_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="config.json: is a directory, expected a file"):
        read_config(tmp_path)


def test_bad_generation_config_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {}}))
    (tmp_path / "generation_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="generation_config.json: not a JSON object"):
        read_config(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": -2}')
    with pytest.raises(CheckpointError) as info:
        read_config(tmp_path)
    assert str(info.value) == f"{tmp_path}/generation_config.json: eos_token_id = -2 " + (
        "is not a token of the vocabulary (vocab_size 50272)"
    )


def test_read_config_names_the_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_with("vision_config.num_hidden_layers", 10**6)))
    with pytest.raises(CheckpointError) as info:
        read_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}/config.json: vision_config.num_hidden_layers = 1000000 ")


def test_read_config_on_the_test_checkpoints(checkpoints, instruct_checkpoints, retrieval_checkpoints):
    """transformers 5.24 writes generation_config.json with the text_config's ids: reading it changes nothing."""
    for path in [*checkpoints.values(), *instruct_checkpoints.values(), *retrieval_checkpoints.values()]:
        config, raw = read_config(path)
        assert raw == json.loads((path / "config.json").read_text())
        assert config == Blip2Config.from_dict(raw), path.name
