"""Quantization as a post-load transform: `blip2.load(..., quantize="int8" | "int4" | "int8-all")`.

Which layers: every `nn.Linear` of the parts a mode names (`Mode.parts`), except the language model's
output head (`lm_head`, often tied to the token embeddings, and the layer whose error goes straight into
the logits). The query tokens and the language projection always stay in float.

- "int8": the language model, per-output-channel int8 (`Int8Linear`), on every device. On the CPU in
  float32 it runs the dynamic int8 kernel (fbgemm's, prepacked at load; the activations are quantized
  per call), which is what `torch.ao.quantization.quantize_dynamic` gives; on CUDA and in half precision
  it is weight-only (the weight is dequantized in the matmul), as bitsandbytes' `load_in_8bit` keeps the
  weights in int8 (LLM.int8() also multiplies in int8, with float outliers split off).
- "int8-all": the same for the vision tower and the Q-Former too (on the CPU with oneDNN's kernel) (transformers keeps the Q-Former and the
  query tokens out of bitsandbytes' conversion; here it is the caller's choice): on the CPU the vision
  tower is a large share of a caption call, which quantizing the language model alone cannot speed up.
- "int4": the language model, group-wise int4 (`Int4Linear`, groups of 128 input features), on CUDA only.
  Compare bitsandbytes' `load_in_4bit` (NF4 or FP4 blocks of 64); here a uniform symmetric grid. On the
  CPU it is refused: no int4 kernel in this torch is faster than float32 there
  (`_weight_int4pack_mm_for_cpu` is 30-100x slower, `_dyn_quant_matmul_4bit` is for Arm's KleidiAI).

benchmarks/quantize_quality.py measures what each mode costs in agreement with float and gains in speed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..config import Blip2Config
from ..errors import InputError
from ..models.quant import Int4Linear, Int8Linear


@dataclass(frozen=True)
class Mode:
    """One value of `quantize=`: for each part of the model it quantizes, how a float Linear there is
    replaced."""

    parts: dict[str, Callable[[nn.Linear], nn.Module]]
    gpu_only: bool = False


def int8_linear(*engines: str) -> Callable[[nn.Linear], nn.Module]:
    """Int8Linear.from_linear prepacking for the first of `engines` this torch has on the CPU (weight-only
    in a torch with none). fbgemm is the faster kernel for the few rows of a decode step, oneDNN for the
    thousands of rows of the vision tower (benchmarks/RESULTS.md, "int8 on the CPU")."""
    engine = next((e for e in engines if e in torch.backends.quantized.supported_engines), None)
    return partial(Int8Linear.from_linear, engine=engine)


FEW_ROWS, MANY_ROWS = int8_linear("fbgemm", "onednn"), int8_linear("onednn", "fbgemm")
MODES = {
    "int8": Mode({"language_model": FEW_ROWS}),
    "int4": Mode({"language_model": Int4Linear.from_linear}, gpu_only=True),
    "int8-all": Mode({"language_model": FEW_ROWS, "vision_model": MANY_ROWS, "qformer": MANY_ROWS}),
}
KEPT_FLOAT = ("lm_head",)  # the output head: its error lands directly in the logits


def parse_quantize(quantize: str | None, device: torch.device) -> str | None:
    """The quantization mode `load` asks for, checked against the device: None (float), "int8" or "int4"."""
    if quantize is None:
        return None
    if not isinstance(quantize, str) or quantize.lower() not in MODES:
        raise InputError(f"quantize must be one of {', '.join(MODES)} or None, got {quantize!r}")
    mode = quantize.lower()
    if MODES[mode].gpu_only and device.type != "cuda":
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


def quantize_linears(model: nn.Module, mode: Mode) -> int:
    """Replace each float `nn.Linear` under each of `mode.parts`, except KEPT_FLOAT, by that part's
    `make(linear)`; returns how many were replaced. A model without a part (retrieval checkpoints have no
    language model) skips it."""
    replaced = 0
    for part, make in mode.parts.items():
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
