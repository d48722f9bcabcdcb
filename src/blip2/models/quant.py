"""Quantized Linear layers: the weight is stored in few bits with float scales.

- `Int8Linear`: one symmetric scale per output channel, w ~= q * scale with q in [-127, 127] (int8). Two
  kernels, picked by where the layer lives:
  - on the CPU in float32, dynamic int8 (what `torch.ao.quantization.quantize_dynamic` does): the weight is
    prepacked once for fbgemm or oneDNN, and each call quantizes its activations to uint8 with one affine
    scale per call (the range of the whole input, 0 included) and multiplies in int8 with int32 sums. On
    this kind of CPU that is the only int8 kernel faster than float32 (weight-only int8 kernels there,
    `_weight_int8pack_mm`, are slower than float32);
  - elsewhere (CUDA, half precision), weight-only: the activations stay in the compute dtype and the
    weight is dequantized in the matmul.
- `Int4Linear`: one symmetric scale per group of `group_size` input features of each output channel,
  q in [-7, 7], two values packed per byte (uint8); weight-only.

Rounding to the nearest level puts every weight within scale / 2 of its float value (no clipping: the
scale is the largest magnitude over the level count), which is the error bound the tests check; the
dynamic kernel adds the activations' rounding, within half their step.

Pure modules: built from a float `nn.Linear` by `from_linear`; which layers to quantize is the loader's
policy (blip2.loading.quantize).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT8_LEVELS = 127
INT4_LEVELS = 7
INT4_GROUP_SIZE = 128
CPU_ENGINES = ("fbgemm", "onednn")  # the dynamic int8 kernels an Int8Linear can be prepacked for


def symmetric_scales(weight: Tensor, levels: int) -> Tensor:
    """The scale of each row of `weight` (.., K): its largest magnitude over `levels`, in float32; an all-zero
    row gets scale 1 (any scale represents it exactly) so that dividing by it is safe."""
    amax = weight.detach().float().abs().amax(dim=-1)
    return torch.where(amax > 0, amax / levels, torch.ones_like(amax))


def quantize_rows(weight: Tensor, scales: Tensor, levels: int) -> Tensor:
    """Each row of `weight` (.., K) divided by its scale (..,) and rounded to the nearest level, as int8."""
    q = torch.round(weight.detach().float() / scales.unsqueeze(-1))
    return q.clamp(-levels, levels).to(torch.int8)


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale + bias, with q (out, in) int8 and one float32 scale per output channel.

    `weight` is the int8 tensor (not floating point, which T5's feed-forward checks before casting to it).
    `packed` is the weight prepacked for a CPU dynamic int8 kernel (see the module doc), or None: then, and
    for inputs it cannot take (not float32, not on the CPU), the weight-only path runs."""

    weight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None, engine: str | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32
        self.register_buffer("bias", bias)  # (out,) in the compute dtype, or None
        self.engine = engine
        self.packed: torch.ScriptObject | None = None
        if engine is not None:
            self.packed = prepack_int8(weight, scale, bias, engine)
        self.reduce_range = needs_reduced_range()

    @classmethod
    def from_linear(cls, linear: nn.Linear, engine: str | None = None) -> Int8Linear:
        """The quantized `linear`; prepacked for `engine` when it is a float32 layer on the CPU (the only
        place the dynamic kernel runs), weight-only when `engine` is None or elsewhere."""
        scale = symmetric_scales(linear.weight, INT8_LEVELS)
        q = quantize_rows(linear.weight, scale, INT8_LEVELS)
        bias = None if linear.bias is None else linear.bias.detach()
        on_cpu = linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32
        return cls(q, scale, bias, engine if on_cpu else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype == torch.float32:
            # Scaling the (.., out) output is the same product as scaling the (out, in) weight, and cheaper.
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
            return y if bias is None else y + bias
        # In half precision x @ q.T can overflow (q is up to 127 times the weight): dequantize the weight.
        return F.linear(x, (self.weight * self.scale[:, None]).to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={'weight-only' if self.packed is None else f'dynamic {self.engine}'}"
        )


def prepack_int8(q: Tensor, scale: Tensor, bias: Tensor | None, engine: str) -> torch.ScriptObject:
    """The (out, in) int8 weight with its per-channel scales, and the float32 bias (fused in the kernel),
    prepacked for `engine`'s dynamic int8 linear (`torch.ops.quantized.linear_dynamic`).

    The prepacked object keeps its engine; the process-wide engine setting is only borrowed for the call.
    torch warns that quantized tensors (the input of prepacking) are deprecated: that warning is silenced
    here, where it is known, and nowhere else."""
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"int8: the {engine} engine is not in this torch build")
    zero_points = torch.zeros(q.shape[0], dtype=torch.long)
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
    finally:
        torch.backends.quantized.engine = previous


def needs_reduced_range() -> bool:
    """Whether dynamic int8 must quantize activations to 7 bits instead of 8 (`reduce_range`).

    Without VNNI (AVX2, AVX-512F alone) fbgemm adds pairs of u8 * s8 products in int16 (vpmaddubsw),
    which saturates for large activations and weights together; 7-bit activations keep those sums in
    range, at twice the activations' rounding error. With VNNI (vpdpbusd sums in int32) nothing saturates,
    so the full 8 bits are used. (Elsewhere, without the check, the safe 7 bits.)"""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (is_vnni is not None and is_vnni())


class Int4Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q in [-7, 7] packed two per byte and one float32 scale per group
    of `group_size` input features of each output channel (what bitsandbytes and torchao call group-wise)."""

    weight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, packed: Tensor, scale: Tensor, bias: Tensor | None, in_features: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, packed.shape[0], group_size
        self.register_buffer("weight", packed)  # (out, in / 2) uint8: low nibble = even column
        self.register_buffer("scale", scale)  # (out, in / group_size) float32
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        out_features, in_features = linear.weight.shape
        group_size = min(group_size, in_features)
        if in_features % group_size or group_size % 2:
            raise ValueError(f"int4: {in_features} input features do not split into groups of {group_size}")
        groups = linear.weight.detach().reshape(out_features, -1, group_size)  # (out, G, group)
        scale = symmetric_scales(groups, INT4_LEVELS)  # (out, G)
        q = quantize_rows(groups, scale, INT4_LEVELS).reshape(out_features, in_features)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(pack_int4(q), scale, bias, in_features, group_size)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The (out, in) weight as the float values it stands for, in `dtype`."""
        q = unpack_int4(self.weight).reshape(self.out_features, -1, self.group_size)
        return (q.to(self.scale.dtype) * self.scale.unsqueeze(-1)).reshape(self.out_features, -1).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def pack_int4(q: Tensor) -> Tensor:
    """(.., 2n) int8 values in [-8, 7] -> (.., n) uint8, two's-complement nibbles, the even column low."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: (.., n) uint8 -> (.., 2n) int8."""
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], dim=-1).flatten(-2)
    return torch.where(q > 7, q - 16, q)
