"""The OPT decoder-only language model of BLIP-2 (OPTForCausalLM in the reference).

Learned absolute positions (offset by 2, counted over the non-pad tokens of each row), pre-LN blocks
(post-LN for opt-350m style checkpoints), queries scaled before the dot product as the reference does.
Parameter names follow the Hugging Face checkpoint layout so its weights load key for key.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import OPTConfig
from .cache import KVCache
from .layers import activation, merge_heads, split_heads

# OPT reserves the first two rows of its position table (a fairseq padding_idx leftover).
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer: int):
        super().__init__()
        c, bias = config.hidden_size, config.enable_bias
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.scaling = (c // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(c, c, bias=bias)
        self.k_proj = nn.Linear(c, c, bias=bias)
        self.v_proj = nn.Linear(c, c, bias=bias)
        self.out_proj = nn.Linear(c, c, bias=bias)

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None, input_pos: Tensor | None) -> Tensor:
        # The reference scales q before the product (not inside the attention), and so do we.
        q = split_heads(self.q_proj(x) * self.scaling, self.num_heads)  # (B, H, T, D)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        if cache is not None and input_pos is not None:
            k, v = cache.update(self.layer, k, v, input_pos)  # (B, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, H, T, D)
        return self.out_proj(merge_heads(y))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer: int):
        super().__init__()
        c, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_ln = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer)
        self.self_attn_layer_norm = nn.LayerNorm(c, elementwise_affine=affine)
        self.fc1 = nn.Linear(c, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, c, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(c, elementwise_affine=affine)
        self.act = activation(config.activation_function)

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None, input_pos: Tensor | None) -> Tensor:
        if self.pre_ln:  # 125m, 1.3b, 2.7b, 6.7b, ...
            x = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache, input_pos)
            x = x + self.mlp(self.final_layer_norm(x))
        else:  # 350m: layer norm after each residual sum
            x = self.self_attn_layer_norm(x + self.self_attn(x, mask, cache, input_pos))
            x = self.final_layer_norm(x + self.mlp(x))
        return x


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        c, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, c)
        # opt-350m embeds words in a narrower space than the blocks.
        self.project_in = nn.Linear(e, c, bias=False) if e != c else None
        self.project_out = nn.Linear(c, e, bias=False) if e != c else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        # Post-LN models, and checkpoints fine-tuned before the reference's v4.20.1, have no final norm.
        has_final = config.do_layer_norm_before and not config.remove_final_layer_norm
        affine = config.layer_norm_elementwise_affine
        self.final_layer_norm = nn.LayerNorm(c, elementwise_affine=affine) if has_final else None

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor,
        cache: KVCache | None,
        input_pos: Tensor | None,
        last_only: bool = False,
    ) -> Tensor:
        """(B, T, E) embeddings of the new positions -> (B, T or 1, E) hidden states."""
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)  # (B, T, C)
        for block in self.layers:
            x = block(x, mask, cache, input_pos)
        if last_only:
            x = x[:, -1:]  # everything below is per position
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    """Holds the decoder only so that parameter names carry the reference's `model.decoder.` prefix."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    # Checkpoints of tied models may omit lm_head.weight; the loader then calls tie_weights().
    tied_weights = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head.weight the very Parameter of the token embeddings, when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, word_embed_proj_dim) token embeddings (no positions)."""
        return self.model.decoder.embed_tokens(input_ids)

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

        inputs_embeds: (B, T, E) embeddings of the new positions only.
        positions: (B, T) their position ids (`layers.position_ids`: pads do not count).
        mask: (B, 1, T, S) boolean, True = attend, over the S keys: the T new ones without a cache, the
            cache's L buffer positions with one (`layers.causal_mask` over the whole length, rows T).
        cache, input_pos: with a cache, the new keys and values are written at input_pos (T,).
        last_only: apply the head at the last position only (prefill before decoding).
        """
        h = self.model.decoder(inputs_embeds, positions, mask, cache, input_pos, last_only)
        return self.lm_head(h)
