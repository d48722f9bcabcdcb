"""The load sequence, one small step each: resolve the name -> read the config -> check it against the weight
files' headers -> read the processors (image settings, tokenizers) -> build the model on the meta device ->
assign the weights -> post-load transforms -> a `Checkpoint`, which the task layer turns into its engine.

Everything small is read and checked before the weights: a bad file fails in a second, not after gigabytes,
and the config is checked against the tensor shapes before anything is built from it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Blip2Config, read_config
from ..errors import CheckpointError, InputError
from ..image_config import ImageProcessorConfig
from ..models.blip2 import Blip2ForConditionalGeneration
from ..models.registry import family
from ..models.retrieval import Blip2ForImageTextRetrieval
from ..text import TextProcessor
from .hub import resolve
from .quantize import parse_quantize, quantize_transform
from .weights import (
    assign_weights,
    check_config_against_checkpoint,
    checkpoint_files,
    dtype_plan,
    lm_dtype,
    read_tensors,
)

RETRIEVAL_ARCHITECTURES = ("Blip2ForImageTextRetrieval",)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# The models a checkpoint builds: captioning (with a language model) or image-text retrieval.
Blip2Model = Blip2ForConditionalGeneration | Blip2ForImageTextRetrieval

# A transform run on the loaded model before it is used (quantization, compilation): model in, model out.
PostLoad = Callable[[nn.Module, Blip2Config], nn.Module]


@dataclasses.dataclass(frozen=True)
class Processors:
    """What turns inputs into model inputs: image settings, the language model's tokenizer and, for
    InstructBLIP, the Q-Former's own BERT tokenizer (it reads the instruction too)."""

    image_config: ImageProcessorConfig
    text: TextProcessor
    qformer_text: TextProcessor | None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model with its weights on `device`, its config and its processors."""

    model: nn.Module
    config: Blip2Config
    processors: Processors
    device: torch.device
    name: str


def load_checkpoint(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    transforms: Sequence[PostLoad] = (),
    quantize: str | None = None,
) -> Checkpoint:
    """Load a local directory in the Hugging Face layout, or a Hub repo id (see `blip2.load`)."""
    device = parse_device(device)  # a wrong device, dtype or quantization fails before anything is read
    dtype = parse_dtype(dtype, device)
    mode = parse_quantize(quantize, device)
    if mode is not None:
        transforms = (*transforms, quantize_transform(mode))
    return load_directory(resolve(name_or_path), device, dtype, str(name_or_path), transforms)


def load_directory(
    directory: Path,
    device: torch.device,
    dtype: torch.dtype,
    name: str = "",
    transforms: Sequence[PostLoad] = (),
) -> Checkpoint:
    """The load sequence for a local checkpoint directory (see the module doc)."""
    config, model_class = read_model_config(directory)
    lm = lm_dtype(config, dtype)
    if lm != dtype:
        # stacklevel 4: the caller of blip2.load (here <- load_checkpoint <- blip2.load).
        warnings.warn(
            f"{family(config.text).label} overflows in float16: its language model is loaded in "
            f"{str(lm).removeprefix('torch.')} instead",
            stacklevel=4,
        )
    files = checkpoint_files(directory)
    check_config_against_checkpoint(config, files)
    processors = read_processors(directory, config)
    model = build_on_meta(model_class, config)
    plan = dtype_plan(config, dtype)
    assign_weights(model, read_tensors(files, device), plan)
    model.set_compute_dtypes(plan)
    ready = post_load(model.eval().requires_grad_(False), config, transforms)
    return Checkpoint(ready, config, processors, device, name or str(directory))


def read_model_config(directory: Path) -> tuple[Blip2Config, type[Blip2Model]]:
    """The checkpoint's config (bounds-checked; generation_config.json's token ids applied) and the model
    class it describes: captioning (a language model) or image-text retrieval (none)."""
    config, raw = read_config(directory)
    if is_retrieval(raw):
        # Their config.json carries a default text_config although there is no language model.
        config = dataclasses.replace(config, text=None)
        if not config.qformer.use_qformer_text_input:
            raise CheckpointError(
                f"{directory}: a retrieval checkpoint needs qformer_config.use_qformer_text_input"
            )
        return config, Blip2ForImageTextRetrieval
    if config.text is None:
        raise CheckpointError(f"{directory}: config.json has no text_config (no language model)")
    return config, Blip2ForConditionalGeneration


def is_retrieval(raw_config: dict) -> bool:
    """Whether a config.json describes an image-text retrieval checkpoint (no language model)."""
    return any(a in RETRIEVAL_ARCHITECTURES for a in raw_config.get("architectures") or [])


def read_processors(directory: Path, config: Blip2Config) -> Processors:
    """The image settings and tokenizers that come with the checkpoint."""
    qformer_text = None
    if config.model_type == "instructblip":
        qformer_text = TextProcessor.from_dir(directory / "qformer_tokenizer")
    return Processors(
        ImageProcessorConfig.from_checkpoint(directory), TextProcessor.from_dir(directory), qformer_text
    )


def build_on_meta(model_class: type[Blip2Model], config: Blip2Config) -> Blip2Model:
    """The model's structure without memory: the weights are assigned afterwards, never copied."""
    with torch.device("meta"):
        return model_class(config)


def post_load(model: nn.Module, config: Blip2Config, transforms: Sequence[PostLoad]) -> nn.Module:
    """`transforms` applied in order to the loaded model (quantization, see blip2.loading.quantize)."""
    for transform in transforms:
        model = transform(model, config)
    return model


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype `load` asks for: a torch.dtype or one of DTYPES' names; None is float32 on CPU, else float16."""
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise InputError(f"dtype must be a string or a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise InputError(f"dtype {dtype!r} is not supported (float32, float16, bfloat16)") from None


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device `load` puts the model on: a name torch knows ("cpu", "cuda", "cuda:1", "mps", ...) of a
    device present here, or None for CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "cpu":
        return parsed
    backend: Any = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise InputError(f"device {device!r}: no {parsed.type} device is available on this machine")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise InputError(f"device {device!r}: this machine has {count} {parsed.type} device(s), from 0")
    return parsed
