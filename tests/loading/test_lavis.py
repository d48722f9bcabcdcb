"""LAVIS .pth -> Hugging Face-layout directory: round trips on tiny checkpoints, and refusals of bad files.

The LAVIS-side names here are written from LAVIS's own modules (Qformer.py's BERT layers, eva_vit.py, the
blip2_*.py model classes), and turned into Hugging Face names with the replacements of transformers'
conversion scripts, independently of the key map in blip2.loading.lavis. The expected model is the base with the same
tensors replaced directly in the Hugging Face layout.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
from blip2.cli import main
from blip2.errors import CheckpointError, InputError
from blip2.loading.lavis import convert_lavis, detect_variant, fuse_qv_bias

QFORMER_LAYERS, CROSS_EVERY, VISION_LAYERS = 3, 2, 2  # blip2.testing's tiny configs


# -- a LAVIS checkpoint, named as LAVIS names it --------------------------------------------------------------
def lavis_qformer_keys(text: bool) -> list[str]:
    """The trained Q-Former keys of a LAVIS model. blip2_opt / blip2_t5 delete the text path (word and position
    embeddings, each layer's `intermediate` / `output`); Blip2Qformer and the instruct models keep it."""
    keys = ["query_tokens", "ln_vision.weight", "ln_vision.bias"]
    keys += [f"Qformer.bert.embeddings.LayerNorm.{p}" for p in ("weight", "bias")]
    if text:
        keys += [f"Qformer.bert.embeddings.{e}.weight" for e in ("word_embeddings", "position_embeddings")]
    for i in range(QFORMER_LAYERS):
        layer = f"Qformer.bert.encoder.layer.{i}"
        for block in ["attention"] + (["crossattention"] if i % CROSS_EVERY == 0 else []):
            for linear in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys += [f"{layer}.{block}.{linear}.{p}" for p in ("weight", "bias")]
        for ffn in ["query"] + (["text"] if text else []):
            suffix = "_query" if ffn == "query" else ""
            for module in (
                f"intermediate{suffix}.dense",
                f"output{suffix}.dense",
                f"output{suffix}.LayerNorm",
            ):
                keys += [f"{layer}.{module}.{p}" for p in ("weight", "bias")]
    return keys


def lavis_vit_keys() -> list[str]:
    """eva_vit.py's VisionTransformer (q_bias / v_bias, no k bias), under blip2.py's `visual_encoder`."""
    keys = ["visual_encoder.cls_token", "visual_encoder.pos_embed"]
    keys += [f"visual_encoder.patch_embed.proj.{p}" for p in ("weight", "bias")]
    for i in range(VISION_LAYERS):
        block = f"visual_encoder.blocks.{i}"
        keys += [f"{block}.attn.qkv.weight", f"{block}.attn.q_bias", f"{block}.attn.v_bias"]
        for module in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            keys += [f"{block}.{module}.{p}" for p in ("weight", "bias")]
    return keys


# As transformers' convert_blip_2_original_to_pytorch.py / convert_instructblip_original_to_pytorch.py rename.
HF_REPLACEMENTS = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj", "vision_model.embeddings.patch_embedding"),
    ("visual_encoder.blocks", "vision_model.encoder.layers"),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.proj.", ".self_attn.projection."),
    ("ln_vision", "vision_model.post_layernorm"),
    ("Qformer.bert", "qformer"),
    ("attention.self", "attention.attention"),
    ("opt_proj", "language_projection"),
    ("t5_proj", "language_projection"),
    ("llm_proj", "language_projection"),
    ("opt_model", "language_model"),
    ("t5_model", "language_model"),
    ("vision_proj", "vision_projection"),
    ("text_proj", "text_projection"),
]


def hf_name(lavis_key: str, embeddings_prefix: str) -> str:
    """The Hugging Face name of a LAVIS key; `embeddings_prefix` is where the base keeps the Q-Former's text
    embeddings and input LayerNorm ("qformer.embeddings." for InstructBLIP, "embeddings." for retrieval)."""
    key = lavis_key
    if key.startswith("Qformer.bert.embeddings.LayerNorm"):
        norm = (
            "qformer.embeddings.layernorm"
            if embeddings_prefix == "qformer.embeddings."
            else "qformer.layernorm"
        )
        return key.replace("Qformer.bert.embeddings.LayerNorm", norm)
    if key.startswith("Qformer.bert.embeddings."):
        return key.replace("Qformer.bert.embeddings.", embeddings_prefix)
    for old, new in HF_REPLACEMENTS:
        key = key.replace(old, new)
    return key


EXTRAS = {  # what Blip2Qformer's state dict holds besides: the ITC temperature, the LM head, a buffer
    "temp": torch.tensor(0.07),
    "Qformer.cls.predictions.bias": torch.zeros(120),
    "Qformer.cls.predictions.transform.dense.weight": torch.ones(32, 32),
    "Qformer.cls.predictions.transform.LayerNorm.weight": torch.ones(32),
    "Qformer.cls.predictions.decoder.weight": torch.ones(120, 32),
    "Qformer.bert.embeddings.position_ids": torch.arange(64).expand((1, -1)),
}


def make_lavis(
    base: Path, lavis_keys: list[str], root: Path, embeddings_prefix: str = "embeddings.", seed: int = 0
) -> tuple[Path, Path]:
    """A LAVIS .pth with `lavis_keys` (values: the base's, perturbed) plus EXTRAS, wrapped as LAVIS's runner
    saves it; and the expected directory: the base with the same tensors replaced in the Hugging Face layout."""
    base_state = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    lavis, replaced = {}, {}
    width = base_state["vision_model.embeddings.class_embedding"].shape[-1]
    for key in lavis_keys:
        name = hf_name(key, embeddings_prefix)
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            fused = re.sub(r"attn\.[qv]_bias$", "self_attn.qkv.bias", name)
            bias = replaced.setdefault(fused, torch.zeros(3 * width))  # EVA has no k bias: zeros there
            part = slice(0, width) if key.endswith("q_bias") else slice(2 * width, None)
            bias[part] = base_state[fused][part] + 0.05 * torch.randn(width, generator=gen)
            lavis[key] = bias[part].clone()
            continue
        tensor = base_state[name] + 0.05 * torch.randn(base_state[name].shape, generator=gen)
        lavis[key], replaced[name] = tensor, tensor
    lavis.update(EXTRAS)
    saved = {
        "model": lavis,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 1e-5, "params": [0]}],
        },
        "config": {"model": {"arch": "blip2"}, "run": {"max_epoch": 5}},
        "scaler": None,
        "epoch": 4,
    }
    pth = root / "checkpoint_4.pth"
    torch.save(saved, pth)
    expected = root / "expected"
    shutil.copytree(base, expected)
    save_file({**base_state, **replaced}, expected / "model.safetensors", metadata={"format": "pt"})
    return pth, expected


def query_output(pipe, photos) -> torch.Tensor:
    pixels = pipe.preprocess([str(p) for p in photos[:2]])
    return pipe.model.query(pipe.model.encode_images(pixels))


# -- round trips ----------------------------------------------------------------------------------------------
def test_opt_round_trip_uses_the_converted_tensors(checkpoints, photos, tmp_path):
    base = checkpoints["opt"]
    pth, expected = make_lavis(
        base, lavis_qformer_keys(text=False) + ["opt_proj.weight", "opt_proj.bias"], tmp_path
    )
    report = convert_lavis(pth, base, tmp_path / "out")
    converted, reference, original = (blip2.load(p) for p in (tmp_path / "out", expected, base))

    assert torch.equal(query_output(converted, photos), query_output(reference, photos))
    assert not torch.allclose(query_output(converted, photos), query_output(original, photos))
    options = dict(num_beams=2, max_new_tokens=8)
    captions = converted.caption([str(p) for p in photos[:3]], **options)
    assert captions == reference.caption([str(p) for p in photos[:3]], **options)
    assert report.variant == "blip2_opt"
    assert {k for k, _ in report.dropped} == set(EXTRAS)
    assert len(report.overridden) == len(lavis_qformer_keys(text=False)) + 2
    assert report.kept == len(load_file(base / "model.safetensors")) - len(report.overridden)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in base.iterdir())


def test_output_loads_in_transformers(checkpoints, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    base = checkpoints["opt"]
    pth, expected = make_lavis(
        base, lavis_qformer_keys(text=False) + ["opt_proj.weight", "opt_proj.bias"], tmp_path
    )
    convert_lavis(pth, base, tmp_path / "out")
    model, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = load_file(expected / "model.safetensors")
    for key, tensor in model.state_dict().items():
        if key in want:
            assert torch.equal(tensor, want[key]), key


def test_t5_with_vit_and_language_model_sharded(checkpoints, photos, tmp_path):
    """A run that also trained the ViT (q_bias / v_bias fused into one qkv bias) and a T5 weight; sharded output."""
    base = checkpoints["t5"]
    keys = lavis_qformer_keys(text=False) + lavis_vit_keys() + ["t5_proj.weight", "t5_proj.bias"]
    keys += ["t5_model.encoder.block.0.layer.1.DenseReluDense.wo.weight", "t5_model.lm_head.weight"]
    pth, expected = make_lavis(base, keys, tmp_path)
    report = convert_lavis(pth, base, tmp_path / "out", max_shard_bytes=64 * 1024)
    assert "model.safetensors.index.json" in report.files and len(report.files) > 2
    converted, reference = blip2.load(tmp_path / "out"), blip2.load(expected)
    assert torch.equal(query_output(converted, photos), query_output(reference, photos))
    options = dict(num_beams=3, max_new_tokens=6)
    assert converted.caption(str(photos[0]), **options) == reference.caption(str(photos[0]), **options)
    assert report.variant == "blip2_t5"


def test_retrieval_round_trip(retrieval_checkpoints, photos, tmp_path):
    base = retrieval_checkpoints["plain"]
    heads = [f"{h}.{p}" for h in ("vision_proj", "text_proj", "itm_head") for p in ("weight", "bias")]
    pth, expected = make_lavis(base, lavis_qformer_keys(text=True) + heads, tmp_path)
    report = convert_lavis(pth, base, tmp_path / "out")
    converted, reference = blip2.load(tmp_path / "out"), blip2.load(expected)
    images, texts = [str(p) for p in photos[:2]], ["a cat on a couch", "two dogs in the park"]
    assert torch.equal(converted.similarity(images, texts), reference.similarity(images, texts))
    assert converted.match(images[0], texts) == reference.match(images[0], texts)
    assert report.variant.startswith("blip2 (Blip2Qformer")


@pytest.mark.parametrize("family, projection", [("t5", "t5_proj"), ("llama", "llm_proj")])
def test_instructblip_round_trip(instruct_checkpoints, photos, tmp_path, family, projection):
    base = instruct_checkpoints[family]
    keys = lavis_qformer_keys(text=True) + [f"{projection}.weight", f"{projection}.bias"]
    pth, expected = make_lavis(base, keys, tmp_path, embeddings_prefix="qformer.embeddings.")
    convert_lavis(pth, base, tmp_path / "out")
    converted, reference = blip2.load(tmp_path / "out"), blip2.load(expected)
    prompt, options = "What is in the picture?", dict(num_beams=2, max_new_tokens=6)
    assert converted.ask(str(photos[0]), prompt, **options) == reference.ask(
        str(photos[0]), prompt, **options
    )
    pixels = converted.preprocess([str(photos[0])])
    assert torch.equal(converted.encode(pixels, prompts=[prompt]), reference.encode(pixels, prompts=[prompt]))


# -- refusals -------------------------------------------------------------------------------------------------
@pytest.fixture
def opt_lavis(checkpoints, tmp_path):
    keys = lavis_qformer_keys(text=False) + ["opt_proj.weight", "opt_proj.bias"]
    pth, _ = make_lavis(checkpoints["opt"], keys, tmp_path)
    return pth


def resave(pth: Path, change) -> Path:
    saved = torch.load(pth, weights_only=True)
    change(saved["model"])
    torch.save(saved, pth)
    return pth


def test_unknown_key_is_named(checkpoints, opt_lavis, tmp_path):
    resave(opt_lavis, lambda m: m.update({"Qformer.bert.encoder.layer.0.adapter.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"Qformer\.bert\.encoder\.layer\.0\.adapter\.weight"):
        convert_lavis(opt_lavis, checkpoints["opt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_is_named(checkpoints, opt_lavis, tmp_path):
    resave(opt_lavis, lambda m: m.update({"opt_proj.weight": torch.ones(48, 32)}))
    with pytest.raises(
        CheckpointError, match=r"opt_proj\.weight: shape \(48, 32\).*language_projection\.weight"
    ):
        convert_lavis(opt_lavis, checkpoints["opt"], tmp_path / "out")


def test_key_the_base_lacks_is_named(checkpoints, opt_lavis, tmp_path):
    resave(
        opt_lavis,
        lambda m: m.update({"Qformer.bert.encoder.layer.1.crossattention.self.query.bias": torch.ones(32)}),
    )
    with pytest.raises(
        CheckpointError, match=r"layer\.1\.crossattention\.self\.query\.bias .*no counterpart"
    ):
        convert_lavis(opt_lavis, checkpoints["opt"], tmp_path / "out")


def test_two_keys_for_one_tensor_are_refused(checkpoints, opt_lavis, tmp_path):
    weight = "model.decoder.final_layer_norm.weight"
    resave(
        opt_lavis,
        lambda m: m.update({f"opt_model.{weight}": torch.ones(32), f"llm_model.{weight}": torch.ones(32)}),
    )
    with pytest.raises(CheckpointError, match=f"both map to language_model.{weight}"):
        convert_lavis(opt_lavis, checkpoints["opt"], tmp_path / "out")


def test_wrong_base_is_refused(checkpoints, opt_lavis, tmp_path):
    with pytest.raises(CheckpointError, match="blip2_opt.*blip2_t5"):
        convert_lavis(opt_lavis, checkpoints["t5"], tmp_path / "out")


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint\n", b"\xff\xd8\xff\xe0" + bytes(64), b"PK\x03\x04" + bytes(40)],
    ids=["empty", "text", "jpeg", "broken-zip"],
)
def test_not_a_checkpoint(checkpoints, tmp_path, content):
    bad = tmp_path / "model.pth"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.pth: not a PyTorch checkpoint"):
        convert_lavis(bad, checkpoints["opt"], tmp_path / "out")


def test_truncated_checkpoint(checkpoints, opt_lavis, tmp_path):
    data = opt_lavis.read_bytes()
    opt_lavis.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint_4.pth"):
        convert_lavis(opt_lavis, checkpoints["opt"], tmp_path / "out")


def test_code_running_pickle_is_refused(checkpoints, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pth = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": Payload()}}, pth)
    with pytest.raises(CheckpointError, match="weights-only"):
        convert_lavis(pth, checkpoints["opt"], tmp_path / "out")
    assert not marker.exists()


def test_state_dict_of_other_things_is_refused(checkpoints, tmp_path):
    pth = tmp_path / "odd.pth"
    torch.save({"model": {"query_tokens": [1, 2, 3]}}, pth)
    with pytest.raises(CheckpointError, match="not named tensors: 'query_tokens'"):
        convert_lavis(pth, checkpoints["opt"], tmp_path / "out")


def test_existing_out_is_refused_unless_forced(checkpoints, opt_lavis, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="--out .*not empty"):
        convert_lavis(opt_lavis, checkpoints["opt"], out)
    with pytest.raises(InputError, match="only a checkpoint directory"):
        convert_lavis(opt_lavis, checkpoints["opt"], out, force=True)  # not a checkpoint: never deleted
    assert (out / "notes.txt").read_text() == "mine"
    convert_lavis(opt_lavis, checkpoints["opt"], out / "model")
    convert_lavis(opt_lavis, checkpoints["opt"], out / "model", force=True)
    assert (out / "model" / "model.safetensors").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_base_outside_files_are_refused(checkpoints, opt_lavis, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(checkpoints["opt"], base)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (base / "tokenizer_config.json").unlink()
    (base / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the base"):
        convert_lavis(opt_lavis, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_shard_outside_is_refused(checkpoints, opt_lavis, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(checkpoints["opt"], base)
    (base / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"query_tokens": "../elsewhere.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    # The loader refuses the name itself, before touching the file system.
    with pytest.raises(CheckpointError, match=r"refused file name '\.\./elsewhere\.safetensors'"):
        convert_lavis(opt_lavis, base, tmp_path / "out")


def test_hugging_face_cache_snapshot_is_a_base(checkpoints, opt_lavis, tmp_path):
    """A cached repo's snapshot holds links into its blobs/ folder: they are followed, being inside the repo."""
    repo = tmp_path / "hub" / "models--Salesforce--blip2-tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(checkpoints["opt"].iterdir())):
        shutil.copyfile(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    report = convert_lavis(opt_lavis, snapshot, tmp_path / "out")
    assert "tokenizer.json" in report.files and not (tmp_path / "out" / "tokenizer.json").is_symlink()


# -- pure parts -----------------------------------------------------------------------------------------------
def test_fuse_qv_bias_puts_zeros_for_k():
    q, v = torch.arange(4.0), torch.arange(4.0) + 10
    fused = fuse_qv_bias({"visual_encoder.blocks.3.attn.q_bias": q, "visual_encoder.blocks.3.attn.v_bias": v})
    assert list(fused) == ["visual_encoder.blocks.3.attn.qkv.bias"]
    assert fused["visual_encoder.blocks.3.attn.qkv.bias"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0, 10, 11, 12, 13]
    with pytest.raises(CheckpointError, match="q_bias has no v_bias"):
        fuse_qv_bias({"visual_encoder.blocks.0.attn.q_bias": q})


def test_detect_variant():
    q = ["query_tokens", "Qformer.bert.embeddings.LayerNorm.weight"]
    text = ["Qformer.bert.embeddings.word_embeddings.weight"]
    assert str(detect_variant(q + ["opt_proj.weight"])) == "blip2_opt"
    assert str(detect_variant(q + ["t5_proj.weight"])) == "blip2_t5"
    assert str(detect_variant(q + text + ["t5_proj.weight"])) == "blip2_t5_instruct"
    assert str(detect_variant(q + text + ["llm_proj.weight"])) == "blip2_vicuna_instruct"
    assert detect_variant(q + text + ["itm_head.weight"]).kind == "retrieval"
    with pytest.raises(CheckpointError, match="Hugging Face checkpoint"):
        detect_variant(["query_tokens", "qformer.layernorm.weight"])
    with pytest.raises(CheckpointError, match="cannot tell"):
        detect_variant(q)


# -- the command ----------------------------------------------------------------------------------------------
def test_cli_convert_lavis(checkpoints, opt_lavis, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert-lavis", str(opt_lavis), "--base", str(checkpoints["opt"]), "--out", str(out), "--json"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    stdout, stderr = capsys.readouterr()
    assert exit_info.value.code == 0
    report = json.loads(stdout)
    assert report["variant"] == "blip2_opt" and {d["key"] for d in report["dropped"]} == set(EXTRAS)
    assert (
        stderr.startswith("converted ")
        and "dropped 4 key(s) (the Q-Former's language-modelling head" in stderr
    )
    assert (out / "model.safetensors").is_file()

    with pytest.raises(SystemExit) as exit_info:
        main(args)  # now --out exists
    _, stderr = capsys.readouterr()
    assert (
        exit_info.value.code == 2 and stderr.startswith("blip2: error: --out") and "Traceback" not in stderr
    )
