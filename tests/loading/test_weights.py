"""Loading: strict keys with clear errors, tied heads, dtype policy, weights-only pickles, hostile files,
the config checked against the weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
from blip2.config import Blip2Config
from blip2.errors import CheckpointError, InputError
from blip2.loading.loader import is_retrieval
from blip2.loading.weights import (
    check_config_against_checkpoint,
    checkpoint_file,
    checkpoint_files,
    read_tensors,
    rename,
)


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


class _RunsCode:
    """Pickles as a call of os.system: a plain unpickler would run the command on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_a_command_is_refused_and_never_runs(checkpoints, tmp_path):
    d = _copy(checkpoints["opt"], tmp_path / "evil")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    state = load_file(checkpoints["opt"] / "model.safetensors")
    torch.save({**state, "payload": _RunsCode(marker)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read with torch's weights-only"):
        blip2.load(d)
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        list(read_tensors([tmp_path / "pytorch_model.bin"], torch.device("cpu")))


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
        blip2.loading.loader.parse_dtype("float8", torch.device("cpu"))


def test_rename_rules():
    rules = [(r"^a\.(\d+)\.w$", r"b.\1.weight"), (r"\.drop$", None)]
    assert rename("a.3.w", rules) == "b.3.weight"
    assert rename("x.drop", rules) is None
    assert rename("kept", rules) == "kept"


# -- hostile files ----------------------------------------------------------------------------------------------
def _index(directory):
    return directory / "model.safetensors.index.json"


def _edit_index(directory, edit):
    data = json.loads(_index(directory).read_text())
    edit(data)
    _index(directory).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name",
    [
        "../x.safetensors",
        "../../x.safetensors",
        "sub/../../x.safetensors",
        "ABSOLUTE",
        "..\\x.safetensors",
        "C:x.safetensors",
        "a\0b.safetensors",
        "",
        "./model.safetensors",
        "a//b.safetensors",
    ],
)
def test_index_cannot_name_files_outside_its_directory(checkpoints, tmp_path, name):
    d = _copy(checkpoints["opt-sharded"], tmp_path / "root" / "ck")
    foreign = tmp_path / "x.safetensors"  # a valid file outside: it must be neither read nor probed
    shutil.copy(sorted(d.glob("model-*.safetensors"))[0], foreign)
    name = str(foreign) if name == "ABSOLUTE" else name

    def edit(data):
        data["weight_map"]["query_tokens"] = name

    _edit_index(d, edit)
    with pytest.raises(CheckpointError) as info:
        blip2.load(d)
    message = str(info.value)
    assert "model.safetensors.index.json" in message and repr(name) in message and "refused" in message


def test_checkpoint_file_accepts_names_inside():
    d = Path("/ck")
    assert checkpoint_file(d, "model-00001-of-00002.safetensors") == d / "model-00001-of-00002.safetensors"
    assert checkpoint_file(d, "sub/x.bin") == d / "sub/x.bin"
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: refused file name 3"):
        checkpoint_file(d, 3, "tokenizer_config.json")


def test_hugging_face_cache_symlinks_are_followed(checkpoints, tmp_path, photos):
    """The cache's snapshot folders hold links into ../../blobs: the files are the directory's own."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in checkpoints["opt-sharded"].iterdir():
        if file.is_file():
            shutil.copy(file, blobs / f"blob-{file.name}")
            (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob-{file.name}")
    (snapshot / "model-00001-of-00020.safetensors").resolve(strict=True)
    options = dict(num_beams=1, max_new_tokens=4)
    assert blip2.load(snapshot).caption(photos[0], **options) == blip2.load(
        checkpoints["opt-sharded"]
    ).caption(photos[0], **options)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"metadata": {}}', "has no weight_map"),
        ('{"weight_map": []}', "has no weight_map"),
        ('{"weight_map": {"query_tokens": 3}}', "must be file names"),
        ('{"weight_map": {"query_tokens": null}}', "must be file names"),
        ("[" * 100_000, "not valid JSON"),  # deeper than Python's stack
        ('{"weight_map": {"query_tokens": "config.json"}}', "not .safetensors files: config.json"),
    ],
)
def test_bad_index_is_named(checkpoints, tmp_path, text, problem):
    d = _copy(checkpoints["opt-sharded"], tmp_path / "ck")
    _index(d).write_text(text)
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: .*{problem}"):
        blip2.load(d)


def test_huge_index_is_refused_before_parsing(checkpoints, tmp_path):
    d = _copy(checkpoints["opt-sharded"], tmp_path / "ck")
    with _index(d).open("r+b") as f:
        f.truncate(17 * 2**20)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="index.json: larger than 16 MiB"):
        blip2.load(d)


def test_index_naming_keys_its_shard_lacks(checkpoints, tmp_path):
    d = _copy(checkpoints["opt-sharded"], tmp_path / "ck")

    def edit(data):
        data["weight_map"]["vision_model.ghost.weight"] = data["weight_map"]["query_tokens"]

    _edit_index(d, edit)
    with pytest.raises(
        CheckpointError, match=r"index.json: lists keys that model-.* does not hold \(1\): vision"
    ):
        blip2.load(d)


def test_directory_where_a_shard_should_be(checkpoints, tmp_path):
    d = _copy(checkpoints["opt-sharded"], tmp_path / "ck")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError, match=f"{shard.name}: is a directory"):
        blip2.load(d)


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize(
    "content, problem",
    [
        (lambda good: good[:-100], "outside the .* bytes of data"),  # truncated
        (lambda good: bytes(range(256)) * 4, "header of"),  # garbage
        (lambda good: (1000).to_bytes(8, "little") + b"{}", "header of 1000 bytes in a file of 10"),
        (lambda good: (5).to_bytes(8, "little") + b"{abc}", "header is not valid JSON"),
        (lambda good: b"\x01\x02", "too short"),
        (lambda good: (200 * 2**20).to_bytes(8, "little") + b"{}", "more than the 104857600 allowed"),
        (lambda good: _header([1]), "not a JSON object"),
        (lambda good: _header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "bad shape"),
        (
            lambda good: _header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}),
            "bad data_offsets",
        ),
        (lambda good: _header({"w": {"dtype": "XX", "shape": [0], "data_offsets": [0, 0]}}), "XX"),
    ],
)
def test_corrupt_safetensors_is_named(checkpoints, tmp_path, content, problem):
    d = _copy(checkpoints["opt"], tmp_path / "ck")
    file = d / "model.safetensors"
    file.write_bytes(content(file.read_bytes()))
    with pytest.raises(
        CheckpointError, match=f"model.safetensors: not a valid safetensors file: .*{problem}"
    ):
        blip2.load(d)


def test_permission_denied_is_not_reported_as_missing(checkpoints, tmp_path, monkeypatch):
    d = _copy(checkpoints["opt"], tmp_path / "ck")
    (d / "model.safetensors").chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make the open fail as it does for other users
        real_open = Path.open

        def denied(self, *args, **kwargs):
            if self.name == "model.safetensors":
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(CheckpointError, match="model.safetensors: permission denied"):
        blip2.load(d)


# -- the config against the weights ------------------------------------------------------------------------------
def _config(directory):
    raw = json.loads((directory / "config.json").read_text())
    config = Blip2Config.from_dict(raw)
    return dataclasses.replace(config, text=None) if is_retrieval(raw) else config


def test_fixtures_fit_their_configs(checkpoints, instruct_checkpoints, retrieval_checkpoints):
    for directory in [*checkpoints.values(), *instruct_checkpoints.values(), *retrieval_checkpoints.values()]:
        check_config_against_checkpoint(_config(directory), checkpoint_files(directory))


def test_a_million_layers_fail_before_anything_is_built(checkpoints):
    config = _config(checkpoints["opt"])
    config.vision.num_hidden_layers = 10**6  # set after parsing, past any bounds config.py applies
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"vision.num_hidden_layers = 1000000, .* hold 2 such layers"):
        check_config_against_checkpoint(config, checkpoint_files(checkpoints["opt"]))
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "kind, tower, field, value, tensor",
    [
        ("t5", "text", "num_decoder_layers", 3, None),
        ("t5", "text", "num_layers", 1, None),
        ("opt", "text", "num_hidden_layers", 5, None),
        ("opt", "qformer", "num_hidden_layers", 4, None),
        ("opt", "text", "vocab_size", 50272, r"embed_tokens.weight of shape \[309, 32\]"),
        ("opt", "vision", "hidden_size", 1408, r"patch_embedding.weight of shape \[32, 3, 8, 8\]"),
        ("t5", "text", "d_model", 64, r"shared.weight of shape \[109, 32\]"),
        ("opt", "text", "max_position_embeddings", 2048, r"embed_positions.weight of shape \[130, 32\]"),
    ],
)
def test_config_field_that_does_not_fit_is_named(checkpoints, kind, tower, field, value, tensor):
    config = _config(checkpoints[kind])
    setattr(getattr(config, tower), field, value)
    with pytest.raises(CheckpointError, match=f"{tower}.{field} = {value}, .*" + (tensor or "")):
        check_config_against_checkpoint(config, checkpoint_files(checkpoints[kind]))


def test_query_token_count_is_checked(instruct_checkpoints):
    config = dataclasses.replace(_config(instruct_checkpoints["llama"]), num_query_tokens=32)
    with pytest.raises(CheckpointError, match=r"num_query_tokens = 32, .*query_tokens of shape \[1, 6, 32\]"):
        check_config_against_checkpoint(config, checkpoint_files(instruct_checkpoints["llama"]))


def test_bin_index_is_confined_too(checkpoints, tmp_path):
    d = _copy(checkpoints["opt"], tmp_path / "ck")
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "x.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "../x.bin"}}))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.index.json: refused file name '../x.bin'"):
        checkpoint_files(d)
