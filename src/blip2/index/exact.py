"""The index's exact stage: BLIP-2 ITC scores from stored query vectors, and a deterministic top k.

An image is its Q L2-normalised projected query vectors (`image_embeds_proj`, (Q, D)); a query is m unit
vectors (m, D): one for a text (its projected [CLS]), the Q vectors of an image for an image query. The score
of image i is the mean over the m query vectors of the best inner product with any of its own:

    score_i = mean_j max_q <v_iq, a_j>

With m = 1 it is exactly `Blip2.similarity`'s ITC score; with an image query it is the Chamfer (ColBERT-style)
similarity, so an identical image scores its maximum.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

# float32 bytes of one block of images converted from the (possibly memory-mapped, fp16) store. Small on
# purpose: the block's fp16 rows (half this) and its float32 copy stay in the L2 cache between the gather,
# the conversion and the product. A million images of 32x256 would be 32 GB as float32, so they are never
# converted as one copy; and a block of a few MiB that leaves the cache costs ~3x (RESULTS.md, session 5).
CHUNK_BYTES = 1 << 20
# The dtypes torch converts natively (F16C / AVX-512); anything else goes through numpy first.
_NATIVE = (np.dtype(np.float16), np.dtype(np.float32))


def maxsim(
    vectors: np.ndarray, query: np.ndarray, rows: np.ndarray | None = None, chunk_bytes: int = CHUNK_BYTES
) -> np.ndarray:
    """Score (n,) float32 of each image in `vectors` (N, Q, D), float16 or float32, possibly a memmap,
    against `query` (m, D) or (D,): the mean over query rows of the max over the image's Q vectors of the inner
    product, computed in float32. `rows` (n,) selects the images to score (sorted reads a memmap in order);
    without it all N are. Reads `vectors` in blocks of about `chunk_bytes` of float32.

    The fp16 -> float32 conversion is torch's (vectorised: numpy's takes ~10x longer and was most of a
    query's time), of one small block at a time; the products are float32 either way."""
    if vectors.ndim != 3 or 0 in vectors.shape[1:]:
        raise InputError(f"vectors must be (n, Q, D) with Q, D > 0, got shape {vectors.shape}")
    _, num_query, dim = vectors.shape
    n = len(vectors) if rows is None else len(rows)
    q = np.asarray(query, dtype=np.float32)
    q = q[None, :] if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
        raise InputError(f"query must be (D,) or (m, D) with D = {dim}, got shape {np.shape(query)}")
    query_t = torch.from_numpy(np.ascontiguousarray(q.T))  # (D, m)
    scores = np.empty(n, dtype=np.float32)
    step = max(1, chunk_bytes // (num_query * dim * 4))
    for start in range(0, n, step):
        block = _block(vectors, start, step, rows)  # (c, Q, D), a fresh array torch may wrap
        sims = torch.from_numpy(block).float() @ query_t  # (c, Q, m) float32
        scores[start : start + len(block)] = sims.amax(dim=1).mean(dim=1).numpy()
    return scores


def _block(vectors: np.ndarray, start: int, step: int, rows: np.ndarray | None) -> np.ndarray:
    """Images [start, start + step) of `vectors`, or of `rows`, copied into a new contiguous array (a memmap
    is read-only, which torch cannot wrap) of float16 or float32 in native byte order."""
    if rows is None:
        part = np.array(vectors[start : start + step])
    else:
        part = np.take(vectors, rows[start : start + step], axis=0)
    return part if part.dtype in _NATIVE else part.astype(np.float32)


def top_k(scores: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of `scores` (n,) as (ids int64, scores float32), score descending, ties by id ascending.

    `ids` (n,) names each score (default: its position). NaN ranks below every number (a crafted vector file
    cannot push garbage to the top). O(n) selection by argpartition, then a stable sort of the selection only;
    every score equal to the k-th is kept through the selection so that the tie-break by id stays exact."""
    values = np.asarray(scores, dtype=np.float32).reshape(-1)
    names = np.arange(len(values), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if names.shape != values.shape:
        raise InputError(f"ids {names.shape} and scores {values.shape} differ in shape")
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    key = np.where(np.isnan(values), -np.inf, values)
    if 0 < k < len(key):
        kth = np.partition(key, len(key) - k)[len(key) - k]  # the k-th largest
        keep = np.flatnonzero(key >= kth)
    else:
        keep = np.arange(len(key))
    order = np.lexsort((names[keep], -key[keep]))[:k]
    chosen = keep[order]
    return names[chosen], values[chosen]
