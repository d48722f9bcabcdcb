"""The layouts the released BLIP-2 / InstructBLIP files come in load to the same model as the fixtures.

Each test rewrites a session fixture into an older or converted layout (see released_layouts.py) and checks
that the loaded model holds the same tensors and gives the same output as the fixture itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from released_layouts import (
    add_rotary_buffers,
    copy_checkpoint,
    edit_config,
    keep_one_alias,
    read_state,
    to_bin_shards,
    write_safetensors,
)

import blip2
from blip2.config import Blip2Config
from blip2.errors import CheckpointError
from blip2.loading.weights import check_config_against_checkpoint, checkpoint_files

OPT_TIED = ("language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight")
T5_SHARED = (
    "language_model.shared.weight",
    "language_model.encoder.embed_tokens.weight",
    "language_model.decoder.embed_tokens.weight",
)
LLAMA_TIED = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
OPTIONS = dict(num_beams=2, max_new_tokens=5)


def load(directory) -> blip2.Blip2:
    """Load as `loading.loader.load_directory` does: the config checked against the weight files' headers first."""
    config = Blip2Config.from_dict(json.loads((directory / "config.json").read_text()))
    check_config_against_checkpoint(config, checkpoint_files(directory))
    return blip2.load(directory)


def assert_same_model(a: blip2.Blip2, b: blip2.Blip2, photo, prompt: str | None = None) -> None:
    """The same tensors under every name, and the same generated text."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert a.caption(photo, prompt, **OPTIONS) == b.caption(photo, prompt, **OPTIONS)


def test_2023_bin_shards_load_through_their_index(checkpoints, tmp_path, photos):
    d = copy_checkpoint(checkpoints["opt-sharded"], tmp_path / "bin")
    shards = to_bin_shards(d)
    # Files that are not the checkpoint's: neither may be read (both would fail if they were).
    (d / "pytorch_model-old.bin").write_bytes(b"not a pickle")
    (d / "lavis.pth").write_bytes(b"not a pickle either")
    assert checkpoint_files(d) == shards
    assert_same_model(load(d), blip2.load(checkpoints["opt-sharded"]), photos[0])


def test_safetensors_preferred_over_bin(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints["opt"], tmp_path / "both")
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    assert checkpoint_files(d) == [d / "model.safetensors"]


def test_opt_embeddings_stored_as_lm_head_only(checkpoints, tmp_path, photos):
    d = copy_checkpoint(checkpoints["opt"], tmp_path / "lm-head")
    keep_one_alias(d, OPT_TIED, "language_model.lm_head.weight")
    assert OPT_TIED[0] not in read_state(d)
    model = load(d)
    lm = model.model.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight  # still one tensor
    assert_same_model(model, blip2.load(checkpoints["opt"]), photos[0])


@pytest.mark.parametrize("alias", T5_SHARED[1:])
def test_t5_shared_stored_as_one_embed_tokens(checkpoints, tmp_path, photos, alias):
    d = copy_checkpoint(checkpoints["t5"], tmp_path / "t5")
    keep_one_alias(d, T5_SHARED, alias)
    assert_same_model(load(d), blip2.load(checkpoints["t5"]), photos[0])


def test_t5_aliases_stored_beside_shared_are_accepted(checkpoints, tmp_path, photos):
    d = copy_checkpoint(checkpoints["t5"], tmp_path / "t5-all")
    state = read_state(d)
    for alias in T5_SHARED[1:]:
        state[alias] = state["language_model.shared.weight"].clone()
    write_safetensors(d, state)
    assert_same_model(load(d), blip2.load(checkpoints["t5"]), photos[0])


def test_llama_tied_head_stored_once(instruct_checkpoints, tmp_path, photos):
    """A LLaMA that ties its head (the config says so): the head alone fills the embeddings."""
    both = copy_checkpoint(instruct_checkpoints["llama"], tmp_path / "both")
    edit_config(both, tie_word_embeddings=True)
    state = read_state(both)
    state[LLAMA_TIED[1]] = state[LLAMA_TIED[0]].clone()
    write_safetensors(both, state)
    one = copy_checkpoint(both, tmp_path / "one")
    keep_one_alias(one, LLAMA_TIED, LLAMA_TIED[1])
    model = load(one)
    lm = model.model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert_same_model(model, blip2.load(both), photos[0], "What is this?")


def test_llama_rotary_buffers_are_dropped(instruct_checkpoints, tmp_path, photos):
    d = copy_checkpoint(instruct_checkpoints["llama"], tmp_path / "rotary")
    add_rotary_buffers(d, layers=2, head_dim=8)
    assert any(k.endswith("rotary_emb.inv_freq") for k in read_state(d))
    assert_same_model(load(d), blip2.load(instruct_checkpoints["llama"]), photos[0], "What is this?")


def test_untied_alias_does_not_fill(checkpoints, tmp_path):
    """Flan-T5 has its own head: the embeddings cannot stand in for it, so a missing head is reported."""
    d = copy_checkpoint(checkpoints["t5"], tmp_path / "no-head")
    edit_config(d, tie_word_embeddings=False)  # as the released Flan-T5 configs say
    state = read_state(d)
    del state["language_model.lm_head.weight"]
    write_safetensors(d, state)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): language_model\.lm_head\.weight"):
        blip2.load(d)


def test_tensor_under_no_alias_is_missing(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints["opt"], tmp_path / "none")
    state = read_state(d)
    for name in OPT_TIED:
        state.pop(name, None)
    write_safetensors(d, state)
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): .*decoder\.embed_tokens\.weight"):
        blip2.load(d)
