"""The index's exact stage: BLIP-2 ITC scores from stored query vectors, and a deterministic top k.

Pure numpy. An image is its Q L2-normalised projected query vectors (`image_embeds_proj`, (Q, D)); a query is
m unit vectors (m, D): one for a text (its projected [CLS]), the Q vectors of an image for an image query.
The score of image i is the mean over the m query vectors of the best inner product with any of its own:

    score_i = mean_j max_q <v_iq, a_j>

With m = 1 it is exactly `Blip2.similarity`'s ITC score; with an image query it is the Chamfer (ColBERT-style)
similarity, so an identical image scores its maximum.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

# float32 bytes of one chunk of vectors converted from the (possibly memory-mapped, fp16) store: a million
# images of 32x256 would be 32 GB as float32, so they are scored a chunk at a time, never as one copy.
CHUNK_BYTES = 32 << 20


def maxsim(
    vectors: np.ndarray, query: np.ndarray, rows: np.ndarray | None = None, chunk_bytes: int = CHUNK_BYTES
) -> np.ndarray:
    """Score (n,) float32 of each image in `vectors` (N, Q, D), float16 or float32, possibly a memmap,
    against `query` (m, D) or (D,): the mean over query rows of the max over the image's Q vectors of the inner
    product, computed in float32. `rows` (n,) selects the images to score (sorted reads a memmap in order);
    without it all N are. Reads `vectors` in slices of about `chunk_bytes` of float32."""
    if vectors.ndim != 3 or 0 in vectors.shape[1:]:
        raise InputError(f"vectors must be (n, Q, D) with Q, D > 0, got shape {vectors.shape}")
    _, num_query, dim = vectors.shape
    n = len(vectors) if rows is None else len(rows)
    q = np.asarray(query, dtype=np.float32)
    q = q[None, :] if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
        raise InputError(f"query must be (D,) or (m, D) with D = {dim}, got shape {np.shape(query)}")
    scores = np.empty(n, dtype=np.float32)
    step = max(1, chunk_bytes // (num_query * dim * 4))
    for start in range(0, n, step):
        part = vectors[start : start + step] if rows is None else vectors[rows[start : start + step]]
        chunk = np.asarray(part, dtype=np.float32)  # (c, Q, D)
        sims = chunk @ q.T  # (c, Q, m)
        scores[start : start + len(chunk)] = sims.max(axis=1).mean(axis=1)
    return scores


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
