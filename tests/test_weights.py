"""Loading: strict keys with clear errors, tied heads, dtype policy, weights-only pickles, hub resolution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
from blip2.errors import CheckpointError, InputError
from blip2.hub import resolve
from blip2.weights import rename


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(directory, edit):
    file = directory / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def test_parameters_are_real_and_query_path_float32(checkpoints):
    model = blip2.load(checkpoints["opt"], dtype="bfloat16")
    m = model.model
    assert not any(p.is_meta for p in m.parameters())
    assert m.query_tokens.dtype == torch.float32
    assert {p.dtype for p in m.qformer.parameters()} == {torch.float32}
    assert {p.dtype for p in m.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m.language_model.parameters()} == {torch.bfloat16}
    assert m.language_projection.weight.dtype == torch.bfloat16


def test_opt_head_tied_to_embeddings_when_absent(checkpoints):
    lm = blip2.load(checkpoints["opt"]).model.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight


def test_t5_untied_head_loaded_as_its_own(checkpoints):
    lm = blip2.load(checkpoints["t5"]).model.language_model
    state = load_file(checkpoints["t5"] / "model.safetensors")
    assert torch.equal(lm.lm_head.weight, state["language_model.lm_head.weight"])
    assert not torch.equal(lm.lm_head.weight, lm.shared.weight)


def test_t5_float16_becomes_bfloat16_with_a_warning(checkpoints):
    with pytest.warns(UserWarning, match="bfloat16"):
        model = blip2.load(checkpoints["t5"], dtype="float16")
    assert {p.dtype for p in model.model.language_model.parameters()} == {torch.bfloat16}
    assert model.model.vision_model.post_layernorm.weight.dtype == torch.float16


def test_bfloat16_logits_close_to_float32(checkpoints, photos):
    full, half = blip2.load(checkpoints["opt"]), blip2.load(checkpoints["opt"], dtype="bfloat16")
    pixels = full.preprocess(photos[0])
    with torch.inference_mode():
        a = full.stepper(full.encode(pixels), ["a photo of"])[0].prefill()
        b = half.stepper(half.encode(pixels), ["a photo of"])[0].prefill()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_missing_key_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["opt"], tmp_path / "ck")
    _edit_weights(d, lambda s: s.pop("qformer.layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): qformer\.layernorm\.weight"):
        blip2.load(d)


def test_unexpected_and_mismatched_keys_are_named(checkpoints, tmp_path):
    d = _copy(checkpoints["opt"], tmp_path / "ck")

    def edit(state):
        state["vision_model.extra.weight"] = torch.zeros(2)
        state["language_projection.bias"] = torch.zeros(3)

    _edit_weights(d, edit)
    with pytest.raises(CheckpointError) as info:
        blip2.load(d)
    message = str(info.value)
    assert "unexpected keys (1): vision_model.extra.weight" in message
    assert "language_projection.bias: checkpoint (3,), model (32,)" in message


def test_missing_shard_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["opt-sharded"], tmp_path / "ck")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        blip2.load(d)


def test_missing_files_are_named(checkpoints, tmp_path):
    for name in ("tokenizer.json", "processor_config.json"):
        d = _copy(checkpoints["opt"], tmp_path / name)
        (d / name).unlink()
        with pytest.raises(
            CheckpointError, match="tokenizer.json" if "tok" in name else "preprocessor_config"
        ):
            blip2.load(d)
    d = _copy(checkpoints["opt"], tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        blip2.load(d)


def test_pickled_weights_load_weights_only(checkpoints, tmp_path, photos):
    d = _copy(checkpoints["opt"], tmp_path / "bin")
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    options = dict(num_beams=2, max_new_tokens=6)
    assert blip2.load(d).caption(photos[0], **options) == blip2.load(checkpoints["opt"]).caption(
        photos[0], **options
    )


def test_pickle_with_code_is_refused(checkpoints, tmp_path):
    d = _copy(checkpoints["opt"], tmp_path / "evil")
    (d / "model.safetensors").unlink()
    torch.save({"x": object()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        blip2.load(d)


def test_legacy_preprocessor_config_is_read(checkpoints, tmp_path, photos):
    d = _copy(checkpoints["opt"], tmp_path / "legacy")
    settings = json.loads((d / "processor_config.json").read_text())["image_processor"]
    settings["size"] = {"height": 48, "width": 48}
    (d / "preprocessor_config.json").write_text(json.dumps(settings))
    assert blip2.load(d).preprocess(photos[0]).shape == (1, 3, 48, 48)


def test_wrong_model_type(checkpoints, tmp_path):
    d = _copy(checkpoints["opt"], tmp_path / "other")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llava"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="llava"):
        blip2.load(d)


def test_bad_dtype():
    with pytest.raises(InputError, match="float8"):
        blip2.pipeline.parse_dtype("float8", torch.device("cpu"))


def test_resolve_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve(tmp_path / "absent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="hf download Salesforce/blip2-flan-t5-xl"):
        resolve("Salesforce/blip2-flan-t5-xl")


def test_rename_rules():
    rules = [(r"^a\.(\d+)\.w$", r"b.\1.weight"), (r"\.drop$", None)]
    assert rename("a.3.w", rules) == "b.3.weight"
    assert rename("x.drop", rules) is None
    assert rename("kept", rules) == "kept"
