"""What the decoding loops need from a language model, the `Stepper` protocol, and its implementations
over our language models (they own the KV cache and the attention mask).

A stepper owns a batch of N rows (images x prompts, later x beams) and their KV cache. The loops in this
package only ever see logits and token ids; they never see embeddings, images or the model's layers.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ..models.cache import KVCache


class Stepper(Protocol):
    def prefill(self) -> Tensor:
        """Run the prompt (for an encoder-decoder: encode, and feed the decoder start token).

        Returns the logits for the first new token, (N, V), float32. Called once, first.
        """

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row (N,) and return the logits for the next one, (N, V), float32."""

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (N',) of the state, in that order: expands rows for beams and samples,
        reorders them after a beam step. Later calls see N' rows."""


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
