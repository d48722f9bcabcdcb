"""Steppers (see stepper.py) over our language models: they own the KV cache and the attention mask."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.cache import KVCache


class DecoderOnlyStepper:
    """For OPT (and any model with `embed(ids)` and `forward(embeds, mask, cache, last_only)`)."""

    def __init__(self, lm: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, num_layers: int):
        self.lm = lm
        self.embeds = inputs_embeds  # (N, T, D), dropped after prefill
        self.mask = attention_mask  # (N, T + generated)
        self.cache = KVCache(num_layers)

    def prefill(self) -> Tensor:
        logits = self.lm(self.embeds, self.mask, self.cache, last_only=True)
        self.embeds = None
        return logits[:, -1].float()

    def step(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        embeds = self.lm.embed(tokens[:, None])
        return self.lm(embeds, self.mask, self.cache, last_only=True)[:, -1].float()

    def select(self, index: Tensor) -> None:
        self.mask = self.mask.index_select(0, index)
        self.cache.select(index)


class EncoderDecoderStepper:
    """For T5: encode once, then decode from the decoder start token with self- and cross-attention caches."""

    def __init__(
        self,
        lm: nn.Module,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        start_token_id: int,
        num_layers: int,
    ):
        self.lm = lm
        self.embeds = inputs_embeds
        self.mask = attention_mask  # encoder mask (N, S)
        self.start = start_token_id
        self.encoded: Tensor | None = None
        self.cache = KVCache(num_layers)

    def prefill(self) -> Tensor:
        self.encoded = self.lm.encode(self.embeds, self.mask)
        self.embeds = None
        start = torch.full((self.mask.shape[0],), self.start, dtype=torch.long, device=self.mask.device)
        return self.step(start)

    def step(self, tokens: Tensor) -> Tensor:
        logits = self.lm.decode(tokens[:, None], self.encoded, self.mask, self.cache, last_only=True)
        return logits[:, -1].float()

    def select(self, index: Tensor) -> None:
        self.mask = self.mask.index_select(0, index)
        self.encoded = self.encoded.index_select(0, index)
        self.cache.select(index)
