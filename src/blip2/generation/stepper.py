"""What the decoding loops need from a language model: the `Stepper` protocol.

A stepper owns a batch of N rows (images x prompts, later x beams) and their KV cache. The loops in this
package only ever see logits and token ids; they never see embeddings, images or the model's layers.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


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
