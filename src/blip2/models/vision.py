"""The EVA ViT-g style image encoder of BLIP-2 (Blip2VisionModel in the reference).

Pre-LN transformer blocks, a fused qkv projection with q and v biases (the k bias is zero in every
checkpoint), exact GELU, and a post-layernorm over all tokens. Parameter names follow the Hugging Face
checkpoint layout so its weights load key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionConfig
from .layers import activation, merge_heads


def resize_position_embedding(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubic resize of (1, 1 + N*N, C) position embeddings to a (h, w) patch grid; the class position stays."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    n = int(patch_pos.shape[1] ** 0.5)
    c = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, n, n, c).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, c)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=p, stride=p)
        num_positions = (config.image_size // p) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.empty(1, num_positions, c))

    def forward(self, pixels: Tensor) -> Tensor:
        b, _, h, w = pixels.shape
        dtype = pixels.dtype  # the tower's compute dtype (VisionModel casts)
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(dtype), patches], dim=1)
        pos: Tensor = self.position_embedding
        grid = (h // self.patch_size, w // self.patch_size)
        if x.shape[1] != pos.shape[1] or grid[0] != grid[1]:
            # An image size other than the checkpoint's: interpolate, as the reference does on request.
            pos = resize_position_embedding(pos, grid)
        return x + pos.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D)
        return self.projection(merge_heads(y))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class VisionModel(nn.Module):
    """pixels (B, 3, H, W) -> image embeddings (B, 1 + H*W/P^2, C), e.g. (B, 257, 1408) for ViT-g at 224."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # The dtype it computes in, set by the loader with the weights' (a quantized Linear's weight does not
        # say it); pixels are cast to it.
        self.dtype = torch.float32

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embeddings(pixels.to(self.dtype))
        for block in self.encoder.layers:
            x = block(x)
        return self.post_layernorm(x)
