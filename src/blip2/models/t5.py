"""Flan-T5 encoder-decoder language model (the text tower of Salesforce/blip2-flan-t5-*).

Parameter names mirror transformers' T5ForConditionalGeneration, so its state dict loads as is (less the
embedding aliases in `key_aliases`). T5 quirks kept exactly: RMS-style layer norm without mean or bias,
unscaled attention scores, a relative position bias computed by block 0 and shared by every block, and
the float16 clamping of the residual stream.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import T5Config
from .cache import KVCache
from .layers import activation


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Bucket of each relative position (key - query), as Mesh TensorFlow's T5.

    Half the buckets are exact small distances, the other half logarithmically wider bins up to
    `max_distance`; farther positions share the last bucket. Bidirectional (encoder) splits the buckets
    between keys before and after the query; unidirectional (decoder) only looks back.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) = -inf for distance 0 only where is_small picks the exact bucket instead
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def _clamp_fp16(x: Tensor) -> Tensor:
    """T5's guard against float16 overflow in the residual stream (a no-op for other dtypes)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


def _masked(bias: Tensor, allowed: Tensor) -> Tensor:
    """Additive attention mask: `bias` where `allowed`, the dtype's minimum elsewhere (as transformers' SDPA)."""
    return torch.where(allowed, bias, torch.finfo(bias.dtype).min).contiguous()


class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction, no bias; the variance in float32 even for half inputs."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, config.num_heads
            )

    def heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, self.n_heads, self.d_kv).transpose(1, 2)  # (B, H, T, D)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(x, self.k), self.heads(x, self.v)

    def forward(self, x: Tensor, bias: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.heads(x, self.q)  # (B, H, T, D)
        # T5 does not scale q.k: the scale is folded into the initialization of q
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(
        self, x: Tensor, bias: Tensor, cache: KVCache | None, input_pos: Tensor | None, index: int
    ) -> Tensor:
        h = self.layer_norm(x)
        k, v = self.SelfAttention.kv(h)
        if cache is not None and input_pos is not None:
            k, v = cache.update(index, k, v, input_pos)  # (B, H, L, D)
        return x + self.SelfAttention(h, bias, k, v)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(
        self, x: Tensor, encoder_hidden: Tensor | None, bias: Tensor, cache: KVCache | None, index: int
    ) -> Tensor:
        attn = self.EncDecAttention

        def compute() -> tuple[Tensor, Tensor]:
            assert encoder_hidden is not None, "the encoder output is needed until the cache holds its K/V"
            return attn.kv(encoder_hidden)

        k, v = compute() if cache is None else cache.cross(index, compute)  # (B, H, S, D), computed once
        return x + attn(self.layer_norm(x), bias, k, v)


class T5DenseReluDense(nn.Module):
    """Feed-forward: wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated (Flan-T5's gated-GELU).

    The activation is the config's dense_act_fn: exact GELU for the released BLIP-2 Flan-T5 checkpoints,
    although their feed_forward_proj "gated-gelu" alone would mean the tanh approximation (see T5Config)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated, self.act = config.is_gated_act, activation(config.dense_act_fn)
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        # wo may be kept in float32 (as transformers does for flan-t5-xxl): follow its dtype, unless it is a
        # quantized one (integer weight), as the reference does
        if self.wo.weight.is_floating_point():
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        layers: list[nn.Module] = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)
        self.is_decoder = is_decoder

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        encoder_hidden: Tensor | None = None,
        cross_bias: Tensor | None = None,
        cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        index: int = 0,
    ) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, bias, cache, input_pos, index))
        if self.is_decoder:
            x = _clamp_fp16(self.layer[1](x, encoder_hidden, cross_bias, cache, index))
        return _clamp_fp16(self.layer[-1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, i == 0) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(self, q_len: int, k_len: int) -> Tensor:
        """Relative position bias (1, H, q_len, k_len) of block 0, for queries at positions 0..q_len."""
        self_attention = cast(T5LayerSelfAttention, cast(T5Block, self.block[0]).layer[0])
        table = self_attention.SelfAttention.relative_attention_bias
        query = torch.arange(q_len, device=table.weight.device)[:, None]
        key = torch.arange(k_len, device=table.weight.device)[None, :]
        buckets = relative_position_bucket(
            key - query,
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        return table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, q_len, k_len)

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        encoder_hidden: Tensor | None = None,
        cross_bias: Tensor | None = None,
        cache: KVCache | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x, bias, encoder_hidden, cross_bias, cache, input_pos, i)
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(nn.Module):
    # transformers' checkpoints store the shared embedding under these names too; the loader drops them
    key_aliases = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }
    tied_weights: dict[str, str]  # per instance: {"lm_head.weight": "shared.weight"} when tied

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tied_weights = {"lm_head.weight": "shared.weight"} if config.tie_word_embeddings else {}
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the head again (needed after load_state_dict(assign=True))."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.shared(input_ids)  # (B, T, d_model); T5 does not scale embeddings

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Encoder over (B, S, d_model) embeddings with a (B, S) 1/0 padding mask -> (B, S, d_model)."""
        S = inputs_embeds.shape[1]
        allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        bias = _masked(self.encoder.position_bias(S, S), allowed)  # (B, H, S, S)
        return self.encoder(inputs_embeds, bias)

    def decoder_self_bias(self, length: int) -> Tensor:
        """Additive self-attention bias (1, H, L, L) of the decoder: relative positions, causal. Built once
        for the whole decode; a step at `input_pos` takes its rows."""
        bias = self.decoder.position_bias(length, length)
        k_pos = torch.arange(length, device=bias.device)
        return _masked(bias, k_pos[None, :] <= k_pos[:, None])

    def decoder_cross_bias(self, encoder_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive cross-attention mask (B, 1, 1, S): no position bias, only the encoder padding."""
        zero = torch.zeros((), dtype=dtype, device=encoder_mask.device)
        return _masked(zero, encoder_mask.bool()[:, None, None, :])

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor | None,
        bias: Tensor,
        cross_bias: Tensor,
        cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T or 1, V) for decoder tokens (B, T).

        bias: (1, H, T, S) rows of `decoder_self_bias` for the T new positions, over the S keys (the T new
            ones without a cache, the cache's L positions with one); cross_bias: `decoder_cross_bias`.
        cache, input_pos: with a cache, the new tokens' keys and values are written at input_pos (T,);
            encoder_hidden is only needed until the cache holds the cross-attention keys and values.
        """
        x = self.shared(decoder_input_ids)  # (B, T, d_model)
        h = self.decoder(x, bias, encoder_hidden, cross_bias, cache, input_pos)  # (B, T, d_model)
        if last_only:
            h = h[:, -1:]
        if self.config.scale_decoder_outputs:
            # original T5 rescales before its head; T5 v1.1 / Flan-T5 do not (see T5Config)
            h = h * self.config.d_model**-0.5
        return self.lm_head(h)
