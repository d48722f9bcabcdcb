"""The ANN stage: search equals a float64 brute force, the tail and dead slots, save/load and its refusals,
and the error without faiss."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from blip2.errors import Blip2Error, InputError
from blip2.index import ann as ann_module
from blip2.index.ann import ANN_FILE, ANN_META, VECTOR_HITS, AnnIndex, AnnParams, search, vector_hits
from blip2.index.exact import maxsim, top_k

Q, D = 4, 32


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """(n, Q, D) float16 unit vectors: each image near one of 8 topics, its Q vectors near the image."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((8, D))
    images = topics[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, D))
    vectors = images[:, None, :] + 0.3 * rng.standard_normal((n, Q, D))
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float16)


def brute_force(vectors, live, query, k):
    """Top k by a float64 MaxSim, one image at a time, ties by slot: independent of exact.py."""
    query = np.atleast_2d(np.asarray(query, np.float64))
    scored = []
    for slot in live.tolist():
        sims = np.asarray(vectors[slot], np.float64) @ query.T  # (Q, m)
        scored.append((-sims.max(axis=0).mean(), slot))
    return [slot for _, slot in sorted(scored)[:k]]


# Every list probed, so the ANN returns every vector: search must then equal brute force exactly.
EXHAUSTIVE = AnnParams(nlist=16, nprobe=16, train_size=2000, hnsw=0)


@pytest.fixture(scope="module")
def vectors():
    return clustered(600)


@pytest.fixture(scope="module")
def ann(vectors):
    return AnnIndex.build(vectors[:400], np.arange(400), EXHAUSTIVE)


def queries(vectors):
    rng = np.random.default_rng(5)
    text = rng.standard_normal(D)
    return [text / np.linalg.norm(text), vectors[17].astype(np.float32), vectors[450, 2].astype(np.float32)]


def test_search_without_ann_is_brute_force(vectors):
    live = np.arange(0, 600, 3)
    for query in queries(vectors):
        slots, scores = search(vectors, live, query, 7)
        assert slots.tolist() == brute_force(vectors, live, query, 7)
        assert np.all(np.diff(scores) <= 0)


def test_search_with_exhaustive_ann_and_tail_is_brute_force(vectors, ann):
    """Slots 400-599 are the tail (not in the ANN); every third slot is dead."""
    assert ann.covered == 400 and ann.index.ntotal == 400 * Q
    live = np.setdiff1d(np.arange(600), np.arange(0, 600, 3))
    for query in queries(vectors):
        slots, _ = search(vectors, live, query, 10, ann, n_candidates=400 * Q)
        assert slots.tolist() == brute_force(vectors, live, query, 10)


def test_candidates_find_the_image_of_a_stored_vector(vectors, ann):
    found = ann.candidates(vectors[123, 1].astype(np.float32), n_vectors=20)
    assert found.dtype == np.int64 and 123 in found.tolist()
    assert np.all(np.diff(found) > 0)
    image_query = ann.candidates(vectors[123].astype(np.float32), n_vectors=5)
    assert 123 in image_query.tolist()


@pytest.mark.parametrize("row", [None, 2])  # a text query (D,), an image query (Q, D)
def test_scored_candidates_approximate_the_exact_score(vectors, ann, row):
    query = vectors[77].astype(np.float32) if row is None else vectors[77, row].astype(np.float32)
    slots, approx = ann.scored_candidates(query, 200)
    assert slots.tolist() == ann.candidates(query, 200).tolist() and approx.dtype == np.float32
    exact = maxsim(vectors, query, slots)
    assert np.abs(approx - exact).max() < 0.15  # 4-bit codes: close, not exact
    assert np.corrcoef(approx, exact)[0, 1] > 0.8


def with_rescore(ann: AnnIndex, rescore: int | None) -> AnnIndex:
    """The same faiss index searched with another `rescore`."""
    return AnnIndex(ann.index, replace(ann.params, rescore=rescore), ann.num_query, ann.dim, ann.covered)


def test_rescore_keeps_the_best_approximate_candidates(vectors, ann):
    query = queries(vectors)[0]
    slots, approx = ann.scored_candidates(query, 400 * Q)
    found, _ = search(vectors, np.arange(400), query, 10, with_rescore(ann, 5), n_candidates=400 * Q)
    assert sorted(found.tolist()) == sorted(top_k(approx, 5, slots)[0].tolist())


def test_rescore_all_is_the_default_and_reranks_every_candidate(vectors, ann):
    """rescore None (the default) re-scores every candidate: with 60 vector hits the result is brute force
    over the candidates' images; rescore N keeps only N of them, the best by approximate score."""
    assert AnnParams().rescore is None and ann.params.rescore is None
    live = np.arange(400)
    for query in queries(vectors):
        slots, approx = ann.scored_candidates(query, 60)
        assert len(slots) > 10
        found, _ = search(vectors, live, query, 10, ann, n_candidates=60)
        assert found.tolist() == brute_force(vectors, slots, query, 10)
        few, _ = search(vectors, live, query, 10, with_rescore(ann, 8), n_candidates=60)
        kept = top_k(approx, 8, slots)[0]
        assert few.tolist() == brute_force(vectors, np.sort(kept), query, 8)


def test_vector_hits_grow_with_the_index_past_a_quarter_million_images():
    assert vector_hits(0) == vector_hits(250_000) == VECTOR_HITS == 2000
    assert vector_hits(500_000) == 4000 and vector_hits(1_000_000) == 8000


def test_search_takes_the_vector_hits_of_its_live_images_by_default(vectors, ann, monkeypatch):
    asked = []
    monkeypatch.setattr(ann_module, "vector_hits", lambda n: asked.append(n) or 60)
    live, query = np.arange(0, 400, 2), queries(vectors)[0]
    found, _ = search(vectors, live, query, 10, ann)
    assert asked == [200]
    assert found.tolist() == search(vectors, live, query, 10, ann, n_candidates=60)[0].tolist()


def test_default_params_find_near_duplicates(vectors):
    """With the default (non-exhaustive) parameters, a stored vector still finds its own image first."""
    ann = AnnIndex.build(vectors, np.arange(600))
    assert (
        ann.params.m == math.gcd(64, D) and ann.params.nlist is not None
    )  # m divides D, nlist chosen from the count
    assert ann.params.nprobe == max(1, ann.params.nlist // 4) == ann.index.nprobe
    for slot in (0, 250, 599):
        slots, _ = search(vectors, np.arange(600), vectors[slot].astype(np.float32), 1, ann)
        assert slots.tolist() == [slot]


def test_add_extends_the_ann(vectors):
    ann = AnnIndex.build(vectors[:300], np.arange(0, 300, 2), EXHAUSTIVE)
    ann.add(vectors[:500], np.arange(300, 500))
    assert ann.covered == 500 and ann.index.ntotal == (150 + 200) * Q
    assert 420 in ann.candidates(vectors[420, 0].astype(np.float32), 5).tolist()
    with pytest.raises(InputError):
        ann.add(vectors, np.arange(100, 200))  # below covered: would duplicate
    with pytest.raises(InputError):
        ann.add(vectors, np.array([550, 540]))  # not sorted
    with pytest.raises(InputError):
        ann.add(vectors[:, :, :16], np.array([550]))  # other dimensions


def test_build_errors(vectors):
    with pytest.raises(InputError):
        AnnIndex.build(vectors, np.zeros(0, np.int64))
    with pytest.raises(InputError):
        AnnIndex.build(vectors, np.array([5, 600]))  # past the end


def test_save_load_round_trip(tmp_path, vectors, ann):
    ann.save(tmp_path)
    loaded = AnnIndex.load(tmp_path, Q, D)
    assert loaded is not None and loaded.covered == 400 and loaded.params == ann.params
    query = queries(vectors)[0]
    assert loaded.candidates(query, 50).tolist() == ann.candidates(query, 50).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ANN_FILE, ANN_META]


def test_an_ann_of_the_first_version_loads_and_rescores_all(tmp_path, vectors, ann):
    """ann.json files written before `rescore` was a parameter have no such key: they still load, and
    re-score every candidate (today's default)."""
    with_rescore(ann, 7).save(tmp_path)
    meta = json.loads((tmp_path / ANN_META).read_text())
    assert meta["params"].pop("rescore") == 7
    (tmp_path / ANN_META).write_text(json.dumps(meta))
    loaded = AnnIndex.load(tmp_path, Q, D)
    assert loaded is not None and loaded.params == replace(ann.params, rescore=None)


def rewrite_meta(directory, **changes):
    meta = json.loads((directory / ANN_META).read_text())
    meta.update(changes)
    (directory / ANN_META).write_text(json.dumps(meta))


def rewrite_params(directory, **changes):
    params = json.loads((directory / ANN_META).read_text())["params"]
    rewrite_meta(directory, params=dict(params, **changes))


def corrupt_bytes(directory):
    data = bytearray((directory / ANN_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / ANN_FILE).write_bytes(bytes(data))


def garbage_with_checksum(directory):
    """A file faiss cannot parse, with a matching checksum: faiss's own error must become None."""
    data = b"IwPf" + bytes(range(256)) * 8
    (directory / ANN_FILE).write_bytes(data)
    rewrite_meta(directory, sha256=hashlib.sha256(data).hexdigest())


def padded_with_checksum(directory):
    """A genuine file padded past the size its parameters allow, with a matching checksum."""
    data = (directory / ANN_FILE).read_bytes() + bytes(64 << 20)
    (directory / ANN_FILE).write_bytes(data)
    rewrite_meta(directory, sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / ANN_FILE).unlink(),
        lambda d: (d / ANN_META).unlink(),
        corrupt_bytes,
        lambda d: (d / ANN_META).write_text("{not json"),
        lambda d: (d / ANN_META).write_text("[1, 2]"),
        lambda d: rewrite_meta(d, covered=-1),
        lambda d: rewrite_meta(d, covered="400"),
        lambda d: rewrite_meta(d, params={"nlist": 16, "unknown": 1}),
        lambda d: rewrite_params(d, rescore=-1),
        lambda d: rewrite_params(d, rescore="200"),
        lambda d: rewrite_meta(d, ntotal=3),
        lambda d: rewrite_meta(d, format="other/1"),
        garbage_with_checksum,
        padded_with_checksum,
    ],
)
def test_load_refuses_what_it_cannot_trust(tmp_path, ann, damage):
    ann.save(tmp_path)
    damage(tmp_path)
    assert AnnIndex.load(tmp_path, Q, D) is None


def test_load_refuses_links_and_fifos(tmp_path, ann):
    (tmp_path / "real").mkdir()
    (tmp_path / "index").mkdir()
    ann.save(tmp_path / "real")
    for name in (ANN_FILE, ANN_META):
        (tmp_path / "index" / name).symlink_to(tmp_path / "real" / name)
    assert AnnIndex.load(tmp_path / "real", Q, D) is not None
    assert AnnIndex.load(tmp_path / "index", Q, D) is None
    (tmp_path / "index" / ANN_FILE).unlink()
    os.mkfifo(tmp_path / "index" / ANN_FILE)
    assert AnnIndex.load(tmp_path / "index", Q, D) is None


def test_load_refuses_other_dimensions(tmp_path, ann):
    ann.save(tmp_path)
    assert AnnIndex.load(tmp_path, Q + 1, D) is None
    assert AnnIndex.load(tmp_path, Q, D * 2) is None


def test_load_refuses_an_ann_of_more_slots_than_the_vectors_file(tmp_path, ann):
    ann.save(tmp_path)
    assert AnnIndex.load(tmp_path, Q, D, n_slots=400) is not None
    assert AnnIndex.load(tmp_path, Q, D, n_slots=399) is None


def test_search_of_no_live_images_is_empty(vectors, ann):
    for index in (None, ann):
        slots, scores = search(vectors, np.zeros(0, np.int64), vectors[1, 0].astype(np.float32), 5, index)
        assert slots.shape == scores.shape == (0,)


def test_load_of_an_empty_directory_is_none(tmp_path):
    assert AnnIndex.load(tmp_path, Q, D) is None


def test_faiss_threads_follow_torch(vectors):
    import faiss

    AnnIndex.build(vectors[:100], np.arange(100), EXHAUSTIVE)
    assert faiss.omp_get_max_threads() == torch.get_num_threads()


def test_without_faiss_brute_force_works_and_the_ann_names_the_extra(monkeypatch, vectors):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    live = np.arange(50)
    query = vectors[3, 0].astype(np.float32)
    assert search(vectors, live, query, 3)[0].tolist() == brute_force(vectors, live, query, 3)
    with pytest.raises(Blip2Error, match=r"pip install 'blip2\[index\]'"):
        AnnIndex.build(vectors, live)


@pytest.mark.parametrize("n", [1, 500, 40_000, 320_000, 3_200_000, 32_000_000])
def test_nlist_for_counts(n):
    nlist = AnnParams().nlist_for(n)
    assert nlist & (nlist - 1) == 0 and 16 <= nlist <= 8192
    assert AnnParams(nlist=100).nlist_for(n) == 100


# -- an index's stale or unreadable ANN file ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage",
    [
        lambda d: rewrite_meta(d, format="blip2-ann/0"),  # another version's file
        lambda d: rewrite_params(d, nlist=8),  # parameters that do not describe ann.faiss
        corrupt_bytes,
    ],
)
def test_an_index_searches_exactly_past_a_stale_ann_and_the_next_add_rebuilds_it(
    tmp_path, monkeypatch, damage
):
    """An ANN file the code cannot trust is never used: the index ranks by brute force (the same top k),
    `info` says the ANN is absent, and the next add rebuilds it."""
    from blip2.index import Index
    from blip2.index import index as index_module

    monkeypatch.setattr(index_module, "BRUTE_FORCE_BELOW", 100)
    vectors = clustered(260, seed=3)
    index = Index(tmp_path / "v.idx")
    index.add_embeddings([f"v{i}" for i in range(250)], vectors[:250], model_name="tiny")
    assert index.info()["ann"] == {"present": True, "covered": 250}
    query = vectors[17, 2].astype(np.float32)
    expected = [f"v{slot}" for slot in brute_force(vectors, np.arange(250), query, 10)]
    assert [hit.image for hit in index.search(embedding=query, k=10)] == expected
    damage(tmp_path / "v.idx")
    assert index.info()["ann"]["present"] is False
    assert [hit.image for hit in index.search(embedding=query, k=10)] == expected
    index.add_embeddings([f"v{i}" for i in range(250, 260)], vectors[250:])
    assert index.info()["ann"] == {"present": True, "covered": 260}
    expected = [f"v{slot}" for slot in brute_force(vectors, np.arange(260), query, 10)]
    assert [hit.image for hit in index.search(embedding=query, k=10)] == expected
