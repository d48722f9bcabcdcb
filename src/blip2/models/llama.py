"""The LLaMA decoder-only language model of InstructBLIP-Vicuna (LlamaForCausalLM in the reference).

Pre-norm blocks with RMSNorm, rotary position embeddings (RoPE) on queries and keys, a SwiGLU MLP, no
biases, an untied head. Grouped-query attention (fewer key/value heads) is supported for completeness;
Vicuna v1.1 has as many key/value heads as query heads. Parameter names follow the Hugging Face checkpoint
layout so its weights load key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LlamaConfig
from .cache import KVCache
from .layers import activation, merge_heads, split_heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight, as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> Tensor:
    """(head_dim / 2,) float32 inverse frequencies, computed on the CPU as the reference computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def rope_table(length: int, inv_freq: Tensor, dtype: torch.dtype) -> Tensor:
    """cos and sin of positions 0..length-1, (2, length, D): angles in float32, then cast, as the reference
    does (each angle is the same float32 product position * inv_freq, so a lookup equals computing it)."""
    positions = torch.arange(length, device=inv_freq.device)
    freqs = positions[:, None].float() * inv_freq  # (L, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (L, D): the two halves of a head share frequencies
    return torch.stack((angles.cos(), angles.sin())).to(dtype)


def rope_cos_sin(positions: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) positions -> cos, sin (B, 1, T, D) looked up in `rope_table`. Pad positions (-1) read row 0:
    a pad query attends only to itself, so its rotation changes no real token."""
    rows = table[:, positions.clamp(min=0)]  # (2, B, T, D)
    return rows[0][:, None], rows[1][:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) by the position angles: pairs are (i, i + D/2), the reference's rotate_half."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        c, d = config.hidden_size, config.head_dim
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = d**-0.5
        self.q_proj = nn.Linear(c, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(c, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(c, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, c, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        cache: KVCache | None,
        input_pos: Tensor | None,
    ) -> Tensor:
        q = apply_rope(split_heads(self.q_proj(x), self.num_heads), cos, sin)  # (B, H, T, D)
        k = apply_rope(split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)  # (B, KV, T, D)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None and input_pos is not None:
            k, v = cache.update(self.layer, k, v, input_pos)  # (B, KV, L, D): cached rotated, few heads
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: each kv head serves a group
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)  # (B, H, T, D)
        return self.o_proj(merge_heads(y))


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(c, f, bias=False)
        self.up_proj = nn.Linear(c, f, bias=False)
        self.down_proj = nn.Linear(f, c, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        cache: KVCache | None,
        input_pos: Tensor | None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Plain attributes, not buffers: the model is built on the meta device and loaded from a
        # checkpoint that has no such tensors. The cos/sin table is built once, on first use, for
        # max_position_embeddings positions (more if a decode is longer), on the activations' device and
        # in their dtype.
        self.inv_freq = rope_frequencies(config.head_dim, config.rope_theta)
        self.max_positions = config.max_position_embeddings
        self.rope: Tensor | None = None

    def rope_table(self, like: Tensor, length: int) -> Tensor:
        """The (2, P, D) cos/sin table for `like`'s device and dtype, P >= length positions."""
        rope = self.rope
        if rope is None or rope.device != like.device or rope.dtype != like.dtype or rope.shape[1] < length:
            rows = max(self.max_positions, length)
            rope = self.rope = rope_table(rows, self.inv_freq.to(like.device), like.dtype)
        return rope

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor,
        cache: KVCache | None,
        input_pos: Tensor | None,
        last_only: bool = False,
    ) -> Tensor:
        """(B, T, C) embeddings of the new positions -> (B, T or 1, C) hidden states."""
        # Positions count the non-pad tokens of each row, as the reference's generate() computes them from
        # the attention mask (cumsum - 1). Note that a plain reference forward() without position_ids
        # uses 0..T-1 whatever the padding, so it differs from generate() on left-padded rows.
        length = x.shape[1] if cache is None else cache.max_length  # positions are below it
        cos, sin = rope_cos_sin(positions, self.rope_table(x, length))  # (B, 1, T, D)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, input_pos)
        if last_only:
            x = x[:, -1:]  # the final norm is per position
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # Only tied checkpoints may omit lm_head.weight (the loader then calls tie_weights()); Vicuna's is untied.
        self.tied_weights = (
            {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
        )
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head.weight the very Parameter of the token embeddings, when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, hidden_size) token embeddings."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: Tensor,
        positions: Tensor,
        mask: Tensor,
        cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T or 1, V) in the model's dtype for the new positions.

        inputs_embeds: (B, T, C) embeddings of the new positions only.
        positions: (B, T) their position ids (`layers.position_ids`: pads do not count).
        mask: (B, 1, T, S) boolean, True = attend, over the S keys: the T new ones without a cache, the
            cache's L buffer positions with one (`layers.causal_mask` over the whole length, rows T).
        cache, input_pos: with a cache, the new keys and values (rotated, num_key_value_heads heads) are
            written at input_pos (T,).
        last_only: apply the head at the last position only (prefill before decoding).
        """
        h = self.model(inputs_embeds, positions, mask, cache, input_pos, last_only)
        return self.lm_head(h)
