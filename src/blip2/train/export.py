"""Checkpoints in the Hugging Face layout, written by training: a fresh randomly initialised one
(`new_checkpoint`), the export of a trained model, and the copy of pretrained parts from another checkpoint
(stage 2 starting from stage 1's Q-Former).

Files written: config.json, model.safetensors, the tokenizer files, preprocessor_config.json; `blip2.load` and
transformers' `from_pretrained` read them. Writes go to a temporary folder renamed into place, so a folder
that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Blip2Config
from ..errors import CheckpointError, InputError
from ..files import read_json
from ..image_config import ImageProcessorConfig
from ..loading.weights import HF_KEY_RULES, checkpoint_files, read_tensors, rename
from ..models.blip2 import Blip2ForConditionalGeneration
from ..models.retrieval import Blip2ForImageTextRetrieval
from ..models.t5 import T5LayerNorm
from ..models.vision import VisionEmbeddings
from ..text import TextProcessor

# The small files of a checkpoint that an export carries over unchanged (weights are written anew).
CARRIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
)
TOKENIZER_FILES = CARRIED_FILES[2:9]
SUB_CONFIG_TYPES = {"vision_config": "blip_2_vision_model", "qformer_config": "blip_2_qformer"}
# The pretrained parts stage 2 takes from stage 1 (`init_from`, `init_parts`): all but the heads and the
# language model, by the part they belong to.
SHARED_PREFIXES = {"vision": ("vision_model.",), "qformer": ("query_tokens", "qformer.", "embeddings.")}


def complete_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A BLIP-2 config.json from the fields given: the model and sub-config types, the architecture (a
    retrieval model when there is no text_config), and the initialisation ranges transformers reads."""
    out = json.loads(json.dumps(dict(config)))  # a deep copy, and only JSON in it
    out.setdefault("model_type", "blip-2")
    retrieval = out.get("text_config") is None
    out.setdefault(
        "architectures", ["Blip2ForImageTextRetrieval" if retrieval else "Blip2ForConditionalGeneration"]
    )
    out.setdefault("initializer_range", 0.02)
    out.setdefault("initializer_factor", 1.0)
    for key, model_type in SUB_CONFIG_TYPES.items():
        out[key] = {**out.get(key, {}), "model_type": model_type}
    if retrieval:
        out["qformer_config"].setdefault("use_qformer_text_input", True)
        out.pop("text_config", None)
    else:
        out["text_config"].setdefault("model_type", "opt")
        out.setdefault("use_decoder_only_language_model", out["text_config"]["model_type"] != "t5")
    return out


def model_class(
    raw_config: Mapping[str, Any],
) -> type[Blip2ForConditionalGeneration | Blip2ForImageTextRetrieval]:
    retrieval = "Blip2ForImageTextRetrieval" in (raw_config.get("architectures") or [])
    return Blip2ForImageTextRetrieval if retrieval else Blip2ForConditionalGeneration


def init_weights_(model: nn.Module, std: float = 0.02) -> None:
    """Initialise as transformers' Blip2PreTrainedModel does: Linear, Conv2d and Embedding weights normal(0, std)
    with zero biases (and a zero padding row), norms 1 and 0, the vision class and position embeddings a
    truncated normal(0, std). The query tokens are normal(0, std) as LAVIS's `init_Qformer` (transformers zeroes
    them, which leaves every query identical: they would stay so, having equal gradients)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (nn.LayerNorm, T5LayerNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                bias = getattr(module, "bias", None)
                if isinstance(bias, Tensor):
                    bias.zero_()
            elif isinstance(module, VisionEmbeddings):
                nn.init.trunc_normal_(module.class_embedding, 0.0, std)
                nn.init.trunc_normal_(module.position_embedding, 0.0, std)
        query_tokens = getattr(model, "query_tokens", None)
        if isinstance(query_tokens, Tensor):
            query_tokens.normal_(0.0, std)


def new_checkpoint(
    directory: str | os.PathLike,
    config: Mapping[str, Any],
    tokenizer: str | os.PathLike,
    image_processor: Mapping[str, Any],
    seed: int = 0,
) -> Path:
    """Write a freshly initialised BLIP-2 checkpoint in the Hugging Face layout to `directory`; returns it.

    config: config.json's fields (vision_config, qformer_config, text_config, num_query_tokens, ...); without a
        text_config it is an image-text retrieval model (stage 1: the Q-Former reads text, so
        qformer_config.vocab_size must cover the BERT tokenizer), with one, a captioning model (stage 2).
    tokenizer: a folder with the tokenizer files (tokenizer.json or vocab.txt, tokenizer_config.json, ...),
        copied as they are: the Q-Former's BERT tokenizer for a retrieval model (its bos_token is the [DEC] of
        ITG), the language model's for a captioning one.
    image_processor: preprocessor_config.json's fields, e.g. {"size": {"height": 64, "width": 64}}; the rest
        are BlipImageProcessor's defaults (bicubic, rescale 1/255, CLIP mean and std).
    """
    directory = Path(directory)
    raw = complete_config(config)
    parsed = Blip2Config.from_dict(raw)  # every field bounds-checked, CheckpointError naming it
    processor = {
        "image_processor_type": "BlipImageProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        **dict(image_processor),
    }
    ImageProcessorConfig.from_dict(processor)  # InputError naming the field
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = model_class(raw)(parsed)
    init_weights_(model, float(raw["initializer_range"]))
    torch.random.set_rng_state(generator_state)
    with staging(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
        copy_tokenizer(Path(tokenizer), tmp)
        TextProcessor.from_dir(tmp)  # a CheckpointError now rather than at load
        save_weights(model, tmp / "model.safetensors")
    return directory


def copy_tokenizer(source: Path, target: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not copied:
        raise InputError(
            f"tokenizer: {source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)"
        )
    for name in copied:
        shutil.copyfile(source / name, target / name)


def weights_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors by Hugging Face name, each storage once (a tied lm_head is left to its embeddings,
    as transformers saves it), contiguous, on the CPU."""
    state: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in seen:
            continue
        seen.add(identity)
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def save_weights(model: nn.Module, file: Path) -> None:
    from safetensors.torch import save_file

    save_file(weights_state(model), str(file), metadata={"format": "pt"})


class staging:
    """`with staging(directory) as tmp:` write into tmp, renamed to `directory` (replacing it) on success."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tmp = directory.with_name(directory.name + ".tmp")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        sync_folder(self.tmp)
        old = self.directory.with_name(self.directory.name + ".old")
        if self.directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.directory, old)
        os.replace(self.tmp, self.directory)
        shutil.rmtree(old, ignore_errors=True)


def sync_folder(folder: Path) -> None:
    """fsync every file of `folder` and the folder itself, so a rename after it publishes complete files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export(model: nn.Module, source: Path, directory: Path) -> Path:
    """Write the trained `model` as a checkpoint: `source`'s config, tokenizer and processor files, and the
    model's weights. Returns `directory`."""
    with staging(directory) as tmp:
        for name in CARRIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        if not (tmp / "preprocessor_config.json").exists():
            write_preprocessor_config(source, tmp)
        if (source / "qformer_tokenizer").is_dir():
            shutil.copytree(source / "qformer_tokenizer", tmp / "qformer_tokenizer")
        save_weights(model, tmp / "model.safetensors")
    return directory


def write_preprocessor_config(source: Path, target: Path) -> None:
    """preprocessor_config.json from the image processor settings that transformers 5 keeps inside
    processor_config.json, so that the export has the file every transformers version reads."""
    settings = read_json(source / "processor_config.json").get("image_processor")
    if not isinstance(settings, dict):
        raise CheckpointError(f"{source} has no image processor settings to export")
    (target / "preprocessor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def copy_pretrained(
    model: nn.Module, source: Path, parts: tuple[str, ...] = tuple(SHARED_PREFIXES)
) -> list[str]:
    """Copy the `parts` of the checkpoint at `source` into `model` where it has them: "vision" (the vision
    tower), "qformer" (the query tokens, the Q-Former and its text embeddings); returns the names copied. A
    shape that differs is an InputError."""
    prefixes = tuple(prefix for part in parts for prefix in SHARED_PREFIXES[part])
    own = dict(model.state_dict(keep_vars=True))
    copied = []
    try:
        files = checkpoint_files(source)
    except CheckpointError as e:
        raise InputError(f"init_from: {e}") from None
    with torch.no_grad():
        for key, tensor in read_tensors(files, torch.device("cpu")):
            name = rename(key, HF_KEY_RULES)
            if name is None or name not in own or not name.startswith(prefixes):
                continue
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise InputError(
                    f"init_from: {source}: {name} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
            copied.append(name)
    if not copied:
        raise InputError(f"init_from: {source} has none of the model's {' or '.join(parts)} weights")
    return copied
