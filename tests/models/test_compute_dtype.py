"""The compute dtype of each part is set once by the loader, not read back from a weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blip2


@pytest.mark.parametrize(
    ("kind", "qformer"),
    [
        ("blip-2", torch.float32),
        ("instructblip", torch.bfloat16),
    ],  # InstructBLIP's Q-Former follows the request
)
def test_loader_sets_the_planned_dtypes(kind, qformer, checkpoints, instruct_checkpoints):
    path = checkpoints["opt"] if kind == "blip-2" else instruct_checkpoints["opt"]
    model = blip2.load(path, device="cpu", dtype="bfloat16").model
    assert model.vision_dtype == model.vision_model.dtype == torch.bfloat16
    assert model.qformer.dtype == qformer
    assert model.head_dtype == torch.bfloat16


class Int8Linear(nn.Module):
    """A stand-in for a weight-only quantized Linear: int8 weight, per-row scales, computes in float."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.weight = (w / self.scale).round().to(torch.int8)
        self.bias = linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, (self.weight.float() * self.scale).to(x.dtype), self.bias.to(x.dtype))


@torch.no_grad()
def test_a_quantized_projection_keeps_the_compute_dtype(checkpoints):
    model = blip2.load(checkpoints["opt"], device="cpu", dtype="float32").model
    features = torch.randn(2, model.config.num_query_tokens, model.config.qformer.hidden_size)
    expected = model.project(features)
    model.language_projection = Int8Linear(model.language_projection)
    got = model.project(features)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
