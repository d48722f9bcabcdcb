"""Key/value cache for incremental decoding.

A model's attention layer calls `cache.update(layer, k, v)` with the keys and values of the new positions,
shaped (B, H, T_new, D), and gets back those of all positions so far. Cross-attention keys and values
(encoder-decoder models) are computed once and kept with `cache.cross(layer, compute)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int):
        self.self_kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.cross_kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Number of positions already cached (self-attention)."""
        first = self.self_kv[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        past = self.self_kv[layer]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        self.self_kv[layer] = (k, v)
        return k, v

    def cross(self, layer: int, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if self.cross_kv[layer] is None:
            self.cross_kv[layer] = compute()
        return self.cross_kv[layer]

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) of every cached tensor: beam reordering, or expanding rows."""

        def pick(kv):
            return None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))

        self.self_kv = [pick(kv) for kv in self.self_kv]
        self.cross_kv = [pick(kv) for kv in self.cross_kv]
