"""Static key/value cache for incremental decoding.

Each layer's keys and values live in buffers preallocated for the whole decode, (B, H, L, D) with L the
maximum length (prompt plus new tokens), and a step writes its new positions into them at `input_pos`
instead of growing them with `torch.cat`. Attention always reads all L positions; the caller's mask hides
the ones not written yet. Buffers keep their address across steps (beam reordering copies in place), so
a decode step over them can be recorded once as a CUDA graph and replayed.

Cross-attention keys and values (encoder-decoder models) are computed once and kept with
`cache.cross(layer, compute)`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, max_length: int):
        self.max_length = max_length
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.cross_kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    def update(self, layer: int, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys and values (B, H, T, D) at positions `input_pos` (T,); returns the layer's
        whole buffers (B, H, L, D). The first write (the prefill) allocates them, zero-filled."""
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            b, h, _, d = k.shape
            keys = self.keys[layer] = k.new_zeros(b, h, self.max_length, d)
            values = self.values[layer] = v.new_zeros(b, h, self.max_length, v.shape[-1])
        keys.index_copy_(2, input_pos, k)
        values.index_copy_(2, input_pos, v)
        return keys, values

    def cross(self, layer: int, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        kv = self.cross_kv[layer]
        if kv is None:
            kv = self.cross_kv[layer] = compute()
        return kv

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) of every cached tensor: beam reordering, or expanding rows.

        A reordering (B' = B) copies into the same buffers, so that a recorded CUDA graph still reads them."""
        self.keys = [None if t is None else select_rows(t, index) for t in self.keys]
        self.values = [None if t is None else select_rows(t, index) for t in self.values]
        self.cross_kv = [
            None if kv is None else (select_rows(kv[0], index), select_rows(kv[1], index))
            for kv in self.cross_kv
        ]


def select_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """Rows `index` of `tensor` (dim 0), written in place when the row count is unchanged."""
    picked = tensor.index_select(0, index)
    if picked.shape != tensor.shape:
        return picked
    return tensor.copy_(picked)
