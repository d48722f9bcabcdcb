"""What the decoding loops need from a language model, the `Stepper` protocol, and its implementations
over our language models (they own the static KV cache, the masks and the positions).

A stepper owns a batch of N rows (images x prompts, later x beams) and their KV cache. The loops in this
package only ever see logits and token ids; they never see embeddings, images or the model's layers.

The decode path is static: `prefill` allocates the cache for the prompt plus `max_new_tokens` and builds
the positions and the key mask of every position once; `step` then takes its rows by `input_pos`, a one-element
device tensor advanced in place. A step is thus a function of fixed-shape tensors at fixed addresses, with
no host sync and no shape-dependent Python, which is what lets `cuda_graphs=True` record it once and replay
it. The recording runs the very `_decode` that the CPU path calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from ..models.cache import KVCache, select_rows
from ..models.layers import causal_mask, position_ids


class Stepper(Protocol):
    def prefill(self, max_new_tokens: int = 1) -> Tensor:
        """Run the prompt (for an encoder-decoder: encode, and feed the decoder start token), with room
        for `max_new_tokens` more positions.

        Returns the logits for the first new token, (N, V), float32. Called once, first.
        """

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row (N,) and return the logits for the next one, (N, V), float32."""

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (N',) of the state, in that order: expands rows for beams and samples,
        reorders them after a beam step. Later calls see N' rows."""


DecodeFn = Callable[[Tensor, Tensor], Tensor]


class DecoderOnlyLM(Protocol):
    """What `DecoderOnlyStepper` calls: OPTForCausalLM, LlamaForCausalLM."""

    def embed(self, input_ids: Tensor) -> Tensor: ...

    def __call__(
        self,
        inputs_embeds: Tensor,
        positions: Tensor,
        mask: Tensor,
        cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor: ...


class EncoderDecoderLM(Protocol):
    """What `EncoderDecoderStepper` calls: T5ForConditionalGeneration."""

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor: ...

    def decoder_self_bias(self, length: int) -> Tensor: ...

    def decoder_cross_bias(self, encoder_mask: Tensor, dtype: torch.dtype) -> Tensor: ...

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor | None,
        bias: Tensor,
        cross_bias: Tensor,
        cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor: ...


class GraphedStep:
    """A decode step `fn(tokens (N,), input_pos (1,)) -> logits (N, V)` recorded once as a CUDA graph.

    `input_pos` is the stepper's own tensor (advanced in place between replays); the tokens are copied into
    a static input. Everything `fn` reads or writes (cache buffers, masks, positions) must keep its address
    while the graph lives: the steppers reorder rows in place, and drop the graph when the row count changes.
    """

    def __init__(self, fn: DecodeFn, tokens: Tensor, input_pos: Tensor):
        self.tokens, self.input_pos = tokens.clone(), input_pos
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: rewrites this position's K/V, same values
            fn(self.tokens, input_pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = fn(self.tokens, input_pos)

    def __call__(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone()  # the static output is overwritten by the next replay


class _StaticStepper:
    """The step bookkeeping shared by both steppers: `input_pos`, and the optional recorded step."""

    input_pos: Tensor

    def __init__(self, cuda_graphs: bool):
        self.cuda_graphs = cuda_graphs
        self.graphed: GraphedStep | None = None

    def _decode(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        if self.cuda_graphs and tokens.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the tokens are on {tokens.device}")
        if not self.cuda_graphs:
            logits = self._decode(tokens, self.input_pos)
        else:
            if self.graphed is None:
                self.graphed = GraphedStep(self._decode, tokens, self.input_pos)
            logits = self.graphed(tokens)
        self.input_pos += 1
        return logits

    def _rows_changed(self) -> None:
        self.graphed = None  # recorded for other buffers


class DecoderOnlyStepper(_StaticStepper):
    """For OPT and LLaMA (any model with `embed(ids)` and `forward(embeds, positions, mask, cache,
    input_pos, last_only)`)."""

    def __init__(
        self,
        lm: nn.Module,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        num_layers: int,
        cuda_graphs: bool = False,
    ):
        super().__init__(cuda_graphs)
        self.lm = cast(DecoderOnlyLM, lm)  # any language model of the registry's family kind
        self.embeds: Tensor | None = inputs_embeds  # (N, T, D), dropped after prefill
        self.mask = attention_mask  # (N, T) the prompt's; (N, L) bool with the new positions after prefill
        self.num_layers = num_layers

    def prefill(self, max_new_tokens: int = 1) -> Tensor:
        assert self.embeds is not None, "prefill is called once"
        n, t = self.mask.shape
        self.mask = torch.cat([self.mask, self.mask.new_ones(n, max_new_tokens)], dim=1).bool()  # (N, L)
        self.positions = position_ids(self.mask)  # (N, L)
        self.cache = KVCache(self.num_layers, t + max_new_tokens)
        prompt = torch.arange(t, device=self.mask.device)
        mask = causal_mask(self.mask, prompt)  # (N, 1, T, L)
        logits = self.lm(self.embeds, self.positions[:, :t], mask, self.cache, prompt, last_only=True)
        self.embeds = None
        self.input_pos = torch.full((1,), t, dtype=torch.long, device=self.mask.device)
        return logits[:, -1].float()

    def _decode(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        embeds = self.lm.embed(tokens[:, None])  # (N, 1, D)
        positions = self.positions.index_select(1, input_pos)  # (N, 1)
        mask = causal_mask(self.mask, input_pos)  # (N, 1, 1, L)
        return self.lm(embeds, positions, mask, self.cache, input_pos, last_only=True)[:, -1].float()

    def select(self, index: Tensor) -> None:
        if index.shape[0] != self.mask.shape[0]:
            self._rows_changed()
        self.mask = select_rows(self.mask, index)
        self.positions = select_rows(self.positions, index)
        self.cache.select(index)


class EncoderDecoderStepper(_StaticStepper):
    """For T5: encode once, then decode from the decoder start token. The self-attention cache is static;
    the cross-attention keys and values are computed once, at prefill."""

    def __init__(
        self,
        lm: nn.Module,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        start_token_id: int,
        num_layers: int,
        cuda_graphs: bool = False,
    ):
        super().__init__(cuda_graphs)
        self.lm = cast(EncoderDecoderLM, lm)  # any language model of the registry's family kind
        self.embeds: Tensor | None = inputs_embeds
        self.mask: Tensor | None = attention_mask  # encoder mask (N, S), dropped after prefill
        self.start = start_token_id
        self.num_layers = num_layers

    def prefill(self, max_new_tokens: int = 1) -> Tensor:
        assert self.embeds is not None and self.mask is not None, "prefill is called once"
        encoded = self.lm.encode(self.embeds, self.mask)  # (N, S, d_model)
        length = 1 + max_new_tokens  # the start token, then the new ones
        self.self_bias = self.lm.decoder_self_bias(length)  # (1, H, L, L)
        self.cross_bias = self.lm.decoder_cross_bias(self.mask, self.self_bias.dtype)  # (N, 1, 1, S)
        self.cache = KVCache(self.num_layers, length)
        device = self.mask.device
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)
        start = torch.full((self.mask.shape[0],), self.start, dtype=torch.long, device=device)
        self.embeds = self.mask = None
        logits = self._decode(start, self.input_pos, encoded)  # fills the cross-attention cache
        self.input_pos += 1
        return logits

    def _decode(self, tokens: Tensor, input_pos: Tensor, encoded: Tensor | None = None) -> Tensor:
        bias = self.self_bias.index_select(2, input_pos)  # (1, H, 1, L)
        logits = self.lm.decode(
            tokens[:, None], encoded, bias, self.cross_bias, self.cache, input_pos, last_only=True
        )
        return logits[:, -1].float()

    def select(self, index: Tensor) -> None:
        if index.shape[0] != self.cross_bias.shape[0]:
            self._rows_changed()
        self.cross_bias = select_rows(self.cross_bias, index)
        self.cache.select(index)
