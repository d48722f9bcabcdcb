"""maxsim and top_k against direct float64 computations, fp16 memmaps read in chunks, and `Blip2.similarity`."""

from __future__ import annotations

import numpy as np
import pytest

import blip2
from blip2.errors import InputError
from blip2.index.exact import maxsim, top_k


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Score of each image, one at a time in float64: mean over query rows of the max over the image's rows."""
    query = np.atleast_2d(np.asarray(query, dtype=np.float64))
    out = []
    for image in np.asarray(vectors, dtype=np.float64):
        out.append(np.mean([max(float(v @ a) for v in image) for a in query]))
    return np.array(out)


@pytest.mark.parametrize("m", [None, 1, 5])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_maxsim_matches_float64(m, dtype):
    rng = np.random.default_rng(0)
    vectors = unit(rng, 23, 4, 16).astype(dtype)
    query = unit(rng, 16) if m is None else unit(rng, m, 16)
    got = maxsim(vectors, query)
    assert got.dtype == np.float32 and got.shape == (23,)
    np.testing.assert_allclose(got, reference(vectors, query), atol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 16 * 4 * 3, 1 << 30])
def test_maxsim_reads_an_fp16_memmap_in_chunks(tmp_path, chunk_bytes):
    rng = np.random.default_rng(1)
    data = unit(rng, 37, 4, 16).astype("<f2")
    path = tmp_path / "vectors.f16"
    data.tofile(path)
    mapped = np.memmap(path, dtype="<f2", mode="r", shape=(37, 4, 16))
    query = unit(rng, 3, 16)
    np.testing.assert_allclose(
        maxsim(mapped, query, chunk_bytes=chunk_bytes), reference(data, query), atol=1e-5
    )
    rows = np.array([0, 5, 6, 30, 36, 2])
    np.testing.assert_allclose(
        maxsim(mapped, query, rows, chunk_bytes), reference(data[rows], query), atol=1e-5
    )


def test_an_identical_image_scores_its_maximum():
    rng = np.random.default_rng(2)
    vectors = unit(rng, 10, 6, 8)
    scores = maxsim(vectors, vectors[3])
    assert scores[3] == pytest.approx(1.0, abs=1e-6)
    assert int(np.argmax(scores)) == 3


def test_maxsim_of_no_images_is_empty():
    assert maxsim(np.zeros((0, 4, 8), np.float16), np.ones(8)).shape == (0,)


@pytest.mark.parametrize(
    "vectors, query",
    [
        (np.zeros((3, 8)), np.ones(8)),  # not (n, Q, D)
        (np.zeros((3, 4, 8)), np.ones(7)),  # D differs
        (np.zeros((3, 4, 8)), np.ones((2, 2, 8))),  # query not (m, D)
        (np.zeros((3, 4, 8)), np.ones((0, 8))),  # no query row
        (np.zeros((3, 0, 8)), np.ones(8)),  # no query vector per image
    ],
)
def test_maxsim_rejects_bad_shapes(vectors, query):
    with pytest.raises(InputError):
        maxsim(vectors, query)


def sorted_reference(scores, ids, k):
    """Sort every (score, id) pair with Python's sort: score descending, id ascending, NaN last."""
    key = [(-s if s == s else float("inf"), i) for s, i in zip(scores.tolist(), ids.tolist())]
    order = sorted(range(len(key)), key=lambda j: key[j])[:k]
    return [ids[j] for j in order]


@pytest.mark.parametrize("k", [0, 1, 5, 17, 40, 100])
def test_top_k_orders_by_score_then_id(k):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=40).astype(np.float32) / 4  # many exact ties
    scores[[4, 9]] = np.nan
    ids = rng.permutation(1000)[:40]
    got_ids, got_scores = top_k(scores, k, ids)
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32
    assert got_ids.tolist() == sorted_reference(scores, ids, k)
    lookup = dict(zip(ids.tolist(), scores.tolist()))
    np.testing.assert_array_equal(got_scores, np.array([lookup[i] for i in got_ids.tolist()], np.float32))


def test_top_k_defaults_to_positions():
    ids, scores = top_k(np.array([0.5, 0.9, 0.5, 0.1]), 3)
    assert ids.tolist() == [1, 0, 2] and scores.tolist() == [0.8999999761581421, 0.5, 0.5]


def test_top_k_errors():
    with pytest.raises(InputError):
        top_k(np.zeros(3), 2, np.arange(4))
    with pytest.raises(InputError):
        top_k(np.zeros(3), -1)


def test_maxsim_of_stored_embeddings_is_blip2_similarity(retrieval_checkpoints, photos):
    """The index's score for a text equals `Blip2.similarity` on the same images (fp32 vectors)."""
    model = blip2.load(retrieval_checkpoints["plain"])
    texts = ["a cat", "a rocket on a launch pad"]
    images = photos[:3]
    vectors = model.embed_images(images)["image_embeds_proj"].numpy()  # (3, Q, D)
    text = model.embed_texts(texts)["text_embeds_proj"].numpy()  # (2, D)
    expected = model.similarity(images, texts).numpy()  # (3, 2)
    for j in range(len(texts)):
        np.testing.assert_allclose(maxsim(vectors, text[j]), expected[:, j], atol=1e-5)
