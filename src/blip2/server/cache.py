"""Vision-tower outputs kept by image content, so that a follow-up request about an image already seen
(another question, a match after a caption) skips the vision tower, the costliest part of a request.

The cache sits in front of `Engine.encode_vision`, which every task calls with a batch of pixels: rows are
keyed by a hash of their pixel values (what the model sees: two encodings of one picture share an entry),
the rows not cached are encoded together, and duplicates within a batch are encoded once. Bounded: at most
`capacity` entries, least recently used out first. Used from the model's worker thread only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from .metrics import Metrics

Encode = Callable[[Tensor], Tensor]


class EncodedImages:
    """An LRU map from pixel content to vision-tower output (257, C), in front of an `encode` function."""

    def __init__(self, encode: Encode, capacity: int, metrics: Metrics | None = None, label: str = ""):
        self.encode = encode
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Tensor] = OrderedDict()
        self._metrics = metrics
        self._label = label

    def __len__(self) -> int:
        return len(self._entries)

    @torch.inference_mode()
    def __call__(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) -> vision-tower outputs (B, 257, C), as `encode` gives them."""
        keys = [_content_key(row) for row in pixels]
        found = {key: self._entries[key] for key in keys if key in self._entries}
        missing = list(dict.fromkeys(key for key in keys if key not in found))  # each once, in order
        self._count("miss", len(missing))  # a duplicate within the batch counts as a hit
        self._count("hit", len(keys) - len(missing))
        if missing:
            first = [keys.index(key) for key in missing]
            encoded = self.encode(pixels[first])  # (M, 257, C)
            for key, row in zip(missing, encoded):
                found[key] = row.clone()  # its own storage: an entry must not hold the whole batch alive
        for key in keys:
            self._remember(key, found[key])
        return torch.stack([found[key] for key in keys])

    def _remember(self, key: bytes, value: Tensor) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _count(self, result: str, n: int) -> None:
        if self._metrics is not None and n:
            self._metrics.cache.inc(n, result=result, model=self._label)


def _content_key(pixels: Tensor) -> bytes:
    """A 128-bit hash of one image's pixel values (3, H, W), their dtype and shape."""
    data = pixels.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.digest()


def install(model: object, capacity: int, metrics: Metrics | None = None, label: str = "") -> EncodedImages:
    """Put a cache of `capacity` entries in front of `model.encode_vision` (a `Blip2` / `Engine`): the task
    functions call it through the instance, so every task then goes through the cache. Returns the cache."""
    cache = EncodedImages(model.encode_vision, capacity, metrics, label)  # type: ignore[attr-defined]
    setattr(model, "encode_vision", cache)  # noqa: B010 (an instance attribute over the method, on purpose)
    return cache
