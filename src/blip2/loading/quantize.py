"""Weight-only quantization as a post-load transform: `blip2.load(..., quantize="int8" | "int4")`.

Which layers: every `nn.Linear` of the language model, except its output head (`lm_head`, often tied to
the token embeddings, and the layer whose error goes straight into the logits). The vision tower stays in
its float dtype (see QUANTIZED_PARTS); the Q-Former, the query tokens and the language projection stay in
float32 by policy, as in the reference (transformers also keeps `query_tokens` and `qformer` out of
bitsandbytes' conversion).

- "int8": per-output-channel int8 (`Int8Linear`), on every device. Compare bitsandbytes' `load_in_8bit`,
  which also keeps the weights in int8 but multiplies in int8 with float outliers split off (LLM.int8());
  here the weight is dequantized in the matmul and the activations stay in the compute dtype. It saves
  memory, not time: on the CPU (torch 2.13, no int8 weight-only kernel faster than float32 here) greedy
  captioning of the mid-size model took about twice as long as in float32 (benchmarks/quantize_quality.py).
- "int4": group-wise int4 (`Int4Linear`, groups of 128 input features), on CUDA only. Compare
  bitsandbytes' `load_in_4bit` (NF4 or FP4 blocks of 64); here a uniform symmetric grid. On the CPU it is
  refused: the weight is dequantized at every call, which there is slower than float32, not faster.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..config import Blip2Config
from ..errors import InputError
from ..models.quant import Int4Linear, Int8Linear

MODES: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "int8": Int8Linear.from_linear,
    "int4": Int4Linear.from_linear,
}
GPU_ONLY = ("int4",)
# The vision tower stays in float: quantizing it too dropped the token match of the tiny Flan-T5 fixture
# from 0.69 to 0.44 (InstructBLIP LLaMA: 0.71 to 0.48; benchmarks/quantize_quality.py), and weight-only
# int8 does not make its large, compute-bound matmuls faster.
QUANTIZED_PARTS = ("language_model",)
KEPT_FLOAT = ("lm_head",)  # the output head: its error lands directly in the logits


def parse_quantize(quantize: str | None, device: torch.device) -> str | None:
    """The quantization mode `load` asks for, checked against the device: None (float), "int8" or "int4"."""
    if quantize is None:
        return None
    if not isinstance(quantize, str) or quantize.lower() not in MODES:
        raise InputError(f"quantize must be one of {', '.join(MODES)} or None, got {quantize!r}")
    mode = quantize.lower()
    if mode in GPU_ONLY and device.type != "cuda":
        raise InputError(
            f"quantize={mode!r} needs a CUDA device (here: {device.type}); on the CPU use quantize='int8'"
        )
    return mode


def quantize_transform(mode: str) -> Callable[[nn.Module, Blip2Config], nn.Module]:
    """The post-load transform that quantizes a loaded model in place with `mode` (see the module doc)."""

    def transform(model: nn.Module, config: Blip2Config) -> nn.Module:
        if quantize_linears(model, MODES[mode]) == 0:
            # stacklevel 6: the caller of blip2.load (<- post_load <- load_directory <- load_checkpoint
            # <- load).
            warnings.warn(
                f"quantize={mode!r} left the model as it was: only a language model is quantized, and an "
                "image-text retrieval checkpoint has none",
                stacklevel=6,
            )
        return model

    return transform


def quantize_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace each float `nn.Linear` under QUANTIZED_PARTS, except KEPT_FLOAT, by `make(linear)`; returns how
    many were replaced. A model without a part (retrieval checkpoints have no language model) skips it."""
    replaced = 0
    for part in QUANTIZED_PARTS:
        root = getattr(model, part, None)
        if root is None:
            continue
        for name, linear in list(root.named_modules()):
            if isinstance(linear, nn.Linear) and name.rsplit(".", 1)[-1] not in KEPT_FLOAT:
                parent_name, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent_name), child, make(linear))
                replaced += 1
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, a tied weight (one Parameter in two places) counted
    once, as `parameters()` yields it once. Works on the meta device too (sizes without memory)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
