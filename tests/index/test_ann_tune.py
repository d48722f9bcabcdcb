"""Choosing nprobe at build time (`AnnParams.tune`, `ann.choose_nprobe`), and `exact.maxsim_each`: checked
against a float64 brute force written here, independent of exact.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from blip2.index.ann import ANN_META, TUNE_K, TUNE_RECALL, AnnIndex, AnnParams, _pseudo_queries, search
from blip2.index.exact import maxsim, maxsim_each

Q, D = 4, 32


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def tight(n: int, seed: int = 0) -> np.ndarray:
    """(n, Q, D) float16: 50 well-separated topics, every vector of an image within ~0.05 of its topic: a
    stored vector's nearest images are its topic's, all in its own inverted list."""
    rng = np.random.default_rng(seed)
    topics = unit(rng.standard_normal((50, D)))
    vectors = topics[rng.integers(0, 50, n)][:, None, :] + 0.05 / np.sqrt(D) * rng.standard_normal((n, Q, D))
    return unit(vectors).astype(np.float16)


def isotropic(n: int, seed: int = 0) -> np.ndarray:
    """(n, Q, D) float16 random unit vectors: no structure, nearest images spread over all lists."""
    return unit(np.random.default_rng(seed).standard_normal((n, Q, D))).astype(np.float16)


def brute_top(vectors: np.ndarray, query: np.ndarray, leave_out: int, k: int) -> list[int]:
    """The k best images by float64 MaxSim, image `leave_out` excluded, ties by slot."""
    scores = (np.asarray(vectors, np.float64) @ np.asarray(query, np.float64)).max(axis=1)  # (n,)
    scores[leave_out] = -np.inf
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def pseudo_recall(ann: AnnIndex, vectors: np.ndarray, nprobe: int, queries: int) -> float:
    """Recall@TUNE_K of the pseudo-queries that `choose_nprobe` draws, searched at `nprobe`, against brute force."""
    probed = AnnIndex(ann.index, replace(ann.params, nprobe=nprobe), Q, D, ann.covered)
    live = np.arange(len(vectors))
    own, pseudo = _pseudo_queries(vectors, live, queries, ann.params.seed)
    hits = 0
    for image, query in zip(own.tolist(), pseudo):
        found, _ = search(vectors, np.delete(live, image), query, TUNE_K, probed)
        hits += len(set(found.tolist()) & set(brute_top(vectors, query, image, TUNE_K)))
    return hits / (TUNE_K * len(own))


BASE = AnnParams(nlist=32, train_size=4000, tune=48)


@pytest.fixture(scope="module")
def tuned():
    """{name: (vectors, the tuned ANN)} on data where one list suffices and on data where it does not."""
    out = {}
    for name, vectors in (("tight", tight(1500)), ("isotropic", isotropic(1500))):
        out[name] = vectors, AnnIndex.build(vectors, np.arange(len(vectors)), BASE)
    return out


def test_tuning_picks_few_lists_on_tight_data_and_more_on_spread_data(tuned):
    easy, hard = tuned["tight"][1].params.nprobe, tuned["isotropic"][1].params.nprobe
    assert easy is not None and hard is not None
    assert easy <= 2 and hard >= 8 * easy
    for _, ann in tuned.values():
        assert ann.index.nprobe == ann.params.nprobe and ann.params.tune == 48


@pytest.mark.parametrize("name", ["tight", "isotropic"])
def test_the_tuned_nprobe_is_the_smallest_power_of_two_reaching_the_target(tuned, name):
    vectors, ann = tuned[name]
    nprobe = ann.params.nprobe
    assert nprobe is not None and nprobe & (nprobe - 1) == 0
    assert nprobe == ann.params.nlist or pseudo_recall(ann, vectors, nprobe, 48) >= TUNE_RECALL
    if nprobe > 1:
        assert pseudo_recall(ann, vectors, nprobe // 2, 48) < TUNE_RECALL


def test_an_explicit_nprobe_wins_over_tuning():
    vectors = isotropic(400)
    ann = AnnIndex.build(vectors, np.arange(400), replace(BASE, nlist=16, nprobe=3))
    assert ann.params.nprobe == ann.index.nprobe == 3


def test_without_tune_nprobe_is_a_quarter_of_the_lists():
    ann = AnnIndex.build(isotropic(400), np.arange(400), replace(BASE, nlist=16, tune=0))
    assert ann.params.nprobe == ann.index.nprobe == 4


def test_a_tuned_ann_saves_and_loads_its_nprobe(tmp_path, tuned):
    vectors, ann = tuned["isotropic"]
    ann.save(tmp_path)
    loaded = AnnIndex.load(tmp_path, Q, D)
    assert loaded is not None and loaded.params == ann.params and loaded.index.nprobe == ann.params.nprobe
    for bad in (-1, "48", 0.5):
        meta = json.loads((tmp_path / ANN_META).read_text())
        meta["params"]["tune"] = bad
        (tmp_path / ANN_META).write_text(json.dumps(meta))
        assert AnnIndex.load(tmp_path, Q, D) is None


def test_maxsim_each_scores_every_query_on_its_own():
    vectors = isotropic(70, seed=4)
    rng = np.random.default_rng(1)
    queries = unit(rng.standard_normal((5, D))).astype(np.float32)
    rows = np.array([3, 9, 10, 40, 69])
    for chosen in (None, rows):
        got = maxsim_each(vectors, queries, chosen, chunk_bytes=3 * Q * D * 4)  # blocks of 3 images
        part = np.asarray(vectors if chosen is None else vectors[chosen], np.float64)
        expected = (part @ queries.T.astype(np.float64)).max(axis=1)  # (n, m)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
        for j in range(len(queries)):
            # the same sums in another BLAS kernel (m = 1 is a matrix-vector product): equal to an ulp
            assert np.allclose(got[:, j], maxsim(vectors, queries[j], chosen), rtol=0, atol=1e-6)
