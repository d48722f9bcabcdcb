"""`blip2.Index` on tiny retrieval checkpoints and the sample photos: rankings against `Blip2.similarity` /
`match` and an independent numpy MaxSim, incremental adds (model calls counted), remove/prune, mismatched
models, bad files, the ANN path, and a crash in a real process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import blip2
from blip2 import ImageError, InputError
from blip2.errors import IndexBusyError, IndexFileError, IndexMismatchError
from blip2.images import load_image
from blip2.index import Index, Where, fingerprint
from blip2.index import index as index_module
from blip2.index.store import open_store

TEXT = "a cat on a red couch"
# fp16 storage: a unit vector's components are rounded to 11 bits, so a cosine moves by at most ~1e-3.
FP16_ATOL = 2e-3


@pytest.fixture(scope="module")
def other(retrieval_checkpoints):
    return blip2.load(retrieval_checkpoints["image-token"], device="cpu")  # other weights (seed 1)


def images_in(folder):
    return sorted(str(p) for p in folder.iterdir())


def brute_force(model, paths, text):
    """(paths, scores) ordered by `Blip2.similarity`, ties by input order: the reference ranking."""
    scores = model.similarity(paths, text)[:, 0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [paths[i] for i in order], scores[order].tolist()


def chamfer(stored, query):
    """Independent float64 Chamfer: mean over query vectors of the best cosine with an image's vectors."""
    return np.einsum("nqd,md->nqm", stored.astype(np.float64), query.astype(np.float64)).max(1).mean(1)


# -- ranking --------------------------------------------------------------------------------------------------
def test_text_search_equals_brute_force_similarity(tmp_path, itm, folder):
    index = Index(tmp_path / "photos.idx", model=itm)
    progress = []
    report = index.add(folder, batch_size=2, progress=lambda done, total: progress.append((done, total)))
    paths = images_in(folder)
    assert sorted(report.added) == paths and not report.skipped and len(index) == len(paths)
    assert progress[-1] == (5, 5) and [done for done, _ in progress] == sorted(done for done, _ in progress)
    hits = index.search(text=TEXT, k=len(paths))
    expected, scores = brute_force(itm, paths, TEXT)
    assert [h.image for h in hits] == expected
    assert [h.rank for h in hits] == list(range(1, len(paths) + 1))
    np.testing.assert_allclose([h.score for h in hits], scores, atol=FP16_ATOL)
    assert [h.image for h in index.search(text=TEXT, k=2)] == expected[:2]


def test_image_query_chamfer(tmp_path, itm, folder):
    index = Index(tmp_path / "photos.idx", model=itm)
    index.add(folder)
    paths = images_in(folder)
    stored = itm.embed_images(paths)["image_embeds_proj"].numpy()  # (N, Q, D)
    query = itm.embed_images(paths[2])["image_embeds_proj"][0].numpy()  # (Q, D)
    scores = chamfer(stored.astype(np.float16), query)
    hits = index.search(image=paths[2], k=len(paths))
    assert hits[0].image == paths[2] and hits[0].score == pytest.approx(1.0, abs=FP16_ATOL)
    assert [h.image for h in hits] == [paths[i] for i in np.argsort(-scores, kind="stable")]
    np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1], atol=1e-5)
    # the same through an (m, D) embedding, and a text's (D,) projection through `embedding`
    assert [h.image for h in index.search(embedding=query, k=3)] == [h.image for h in hits[:3]]
    text = itm.embed_texts(TEXT)["text_embeds_proj"][0].numpy()
    assert [h.image for h in index.search(embedding=text * 3.0, k=5)] == brute_force(itm, paths, TEXT)[0]


def test_rerank_orders_by_match(tmp_path, itm, folder):
    index = Index(tmp_path / "photos.idx", model=itm)
    index.add(folder)
    paths = images_in(folder)
    hits = index.search(text=TEXT, k=3, rerank=True, rerank_k=len(paths))
    probs = dict(zip(paths, itm.match(paths, TEXT)))
    ranked = sorted(paths, key=lambda p: -probs[p])
    assert [h.image for h in hits] == ranked[:3]
    np.testing.assert_allclose([h.match for h in hits], [probs[p] for p in ranked[:3]], rtol=1e-5)
    assert [h.to_dict().keys() for h in hits][0] == {"rank", "image", "score", "match"}
    # only the top rerank_k by ITC are re-scored (at least k)
    top2 = [h.image for h in index.search(text=TEXT, k=2)]
    assert [h.image for h in index.search(text=TEXT, k=2, rerank=True, rerank_k=1)] == sorted(
        top2, key=lambda p: -probs[p]
    )
    assert [h.image for h in index.search(text=TEXT, k=1, rerank=True, rerank_k=2)] == sorted(
        top2, key=lambda p: -probs[p]
    )[:1]


def test_rerank_reports_a_missing_file(tmp_path, itm, folder):
    index = Index(tmp_path / "photos.idx", model=itm)
    index.add(folder)
    gone = images_in(folder)[0]
    os.remove(gone)
    hits = index.search(text=TEXT, k=5, rerank=True)
    assert hits[-1].image == gone and hits[-1].match is None and hits[-1].error == "file not found"
    assert all(h.match is not None for h in hits[:-1])


def test_where_caption_and_path(tmp_path, itm, folder, checkpoints):
    captioner = blip2.load(checkpoints["opt"], device="cpu")
    index = Index(tmp_path / "photos.idx", model=itm)
    paths = images_in(folder)
    index.add(paths[:2], caption_model=captioner)
    index.add(paths[2:])
    captions = captioner.caption(paths[:2], max_new_tokens=30, num_beams=5)
    hits = index.search(text=TEXT, k=10)
    assert {h.image: h.caption for h in hits} == {
        **dict(zip(paths[:2], captions)),
        **dict.fromkeys(paths[2:]),
    }
    word = captions[0].split()[0]
    with_word = {p for p, c in zip(paths[:2], captions) if word.lower() in c.lower()}
    assert {h.image for h in index.search(text=TEXT, where=Where(caption=word.upper()))} == with_word
    assert [h.image for h in index.search(text=TEXT, where=Where(path="*.png"))] == [
        str(folder / "noise.png")
    ]
    # the files indexed without a caption get one when given again with a captioning model
    report = index.add(folder, caption_model=captioner)
    assert sorted(report.unchanged) == paths and report.embedded == 0
    expected = dict(zip(paths, captioner.caption(paths, max_new_tokens=30, num_beams=5)))
    assert {h.image: h.caption for h in index.search(text=TEXT, k=10)} == expected


# -- incremental ------------------------------------------------------------------------------------------------
def test_incremental_add(tmp_path, counted, folder):
    model, calls = counted
    index = Index(tmp_path / "photos.idx", model=model)
    paths = images_in(folder)
    index.add(folder)
    assert len(calls) == len(paths)

    calls.clear()
    report = index.add(folder)  # nothing changed: nothing read, nothing embedded
    assert sorted(report.unchanged) == paths and len(calls) == 0 and report.embedded == 0

    os.utime(paths[0], (1, 1))  # touched, same content: hashed, not embedded
    assert index.add(paths[0]).unchanged == [paths[0]] and len(calls) == 0

    moved = str(folder / "moved.jpg")
    os.rename(paths[1], moved)
    copied = str(folder / "copy.png")
    shutil.copy(paths[4], copied)
    Image.open(paths[2]).rotate(90).save(paths[2])  # changed content
    report = index.add(folder)
    assert report.moved == [(paths[1], moved)] and report.copied == [copied]
    assert report.reembedded == [paths[2]] and len(calls) == 1
    assert len(index) == len(paths) + 1

    # the index answers as one built from scratch over the files as they are now
    now = images_in(folder)
    hits = {h.image: h.score for h in index.search(text=TEXT, k=10)}
    expected = dict(zip(*brute_force(model, now, TEXT)))
    assert hits.keys() == expected.keys()
    np.testing.assert_allclose([hits[p] for p in now], [expected[p] for p in now], atol=FP16_ATOL)


def test_remove_and_prune(tmp_path, itm, folder):
    index = Index(tmp_path / "photos.idx", model=itm)
    index.add(folder)
    paths = images_in(folder)
    assert index.remove([paths[0], os.path.relpath(paths[1])]) == 2
    assert index.remove([paths[0]]) == 0
    os.remove(paths[2])
    assert index.prune() == [paths[2]]
    assert sorted(h.image for h in index.search(text=TEXT, k=10)) == paths[3:]
    assert len(index) == len(paths) - 3
    before = index.search(text=TEXT, k=10)
    index.compact()
    assert index.meta().slots == len(paths) - 3
    assert [(h.image, h.score) for h in index.search(text=TEXT, k=10)] == [(h.image, h.score) for h in before]


def test_another_checkpoint_is_a_mismatch(tmp_path, itm, other, folder):
    Index(tmp_path / "photos.idx", model=itm).add(folder)
    wrong = Index(tmp_path / "photos.idx", model=other)
    with pytest.raises(IndexMismatchError, match="another checkpoint"):
        wrong.search(text=TEXT)
    Image.open(folder / "coffee.jpg").save(folder / "new.jpg", quality=50)
    with pytest.raises(IndexMismatchError):
        wrong.add(folder / "new.jpg")


def test_fingerprint_is_the_same_in_every_dtype(retrieval_checkpoints, itm, other):
    for dtype in ("float16", "bfloat16"):
        assert fingerprint(
            blip2.load(retrieval_checkpoints["plain"], device="cpu", dtype=dtype)
        ) == fingerprint(itm)
    assert fingerprint(itm) != fingerprint(other)


def test_empty_index_and_missing_index(tmp_path, itm, folder):
    (folder / "notes.txt").write_text("hello")
    index = Index(tmp_path / "empty.idx", model=itm)
    assert len(index) == 0
    with pytest.raises(IndexFileError):
        index.search(text=TEXT)
    report = index.add(folder / "notes.txt")
    assert report.skipped[0].reason == "not an image (unknown content)"
    assert index.search(text=TEXT) == [] and len(index) == 0


def test_bad_files_are_skipped_with_reasons(tmp_path, itm, folder):
    data = (folder / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.jpg").write_text("not an image")
    shutil.copy(folder / "coffee.jpg", os.fsdecode(bytes(folder / "caf\xe9") + b"\xff.jpg"))
    index = Index(tmp_path / "photos.idx", model=itm)
    report = index.add([folder, folder / "missing.jpg"])
    reasons = {os.path.basename(s.path): s.reason for s in report.skipped}
    assert reasons.keys() == {"truncated.jpg", "notes.jpg", "missing.jpg", "caf\xe9\udcff.jpg"}
    assert reasons["caf\xe9\udcff.jpg"] == "the file name is not valid UTF-8, which the index cannot store"
    assert index.remove([os.fsdecode(b"\xff.jpg")]) == 0
    with pytest.raises(ImageError) as decoded:
        load_image(folder / "truncated.jpg")
    assert reasons["truncated.jpg"] == decoded.value.reason
    assert len(index) == 5 and "truncated.jpg" not in {
        os.path.basename(h.image) for h in index.search(text=TEXT)
    }


@pytest.mark.parametrize(
    "query, message",
    [
        (dict(embedding=np.full(16, np.nan)), "NaN"),
        (dict(embedding=np.zeros(16)), "zeros"),
        (dict(embedding=np.ones(7)), "expected shape"),
        (dict(text=TEXT, image="x.jpg"), "one of"),
        (dict(), "one of"),
        (dict(text=TEXT, k=0), "k must be"),
        (dict(image="x.jpg", rerank=True), "rerank needs a text"),
    ],
)
def test_bad_queries(tmp_path, itm, folder, query, message):
    index = Index(tmp_path / "photos.idx", model=itm)
    index.add(folder / "coffee.jpg")
    with pytest.raises(InputError, match=message):
        index.search(**query)


def test_a_second_writer_waits_then_fails(tmp_path, itm, folder):
    index = Index(tmp_path / "photos.idx", model=itm, lock_timeout=0.2)
    index.add(folder / "coffee.jpg")
    with open_store(tmp_path / "photos.idx", writable=True):
        with pytest.raises(IndexBusyError):
            index.add(folder)
        assert len(index.search(text=TEXT)) == 1  # readers take no lock
    assert len(index.add(folder).added) == 4


# -- vectors made elsewhere -------------------------------------------------------------------------------------
def test_add_embeddings_then_search(tmp_path, itm, folder):
    paths = images_in(folder)
    vectors = itm.embed_images(paths)["image_embeds_proj"].numpy()
    plain = Index(tmp_path / "e.idx")
    assert plain.add_embeddings(paths, vectors, model_name="tiny") == len(paths)
    assert plain.meta().model == "tiny" and plain.meta().fingerprint == ""
    searched = Index(tmp_path / "e.idx", model=itm).search(text=TEXT, k=10)
    assert [h.image for h in searched] == brute_force(itm, paths, TEXT)[0]
    with pytest.raises(IndexMismatchError):
        plain.add_embeddings(paths[:1], vectors[:1, :3])
    with pytest.raises(InputError, match="keys"):
        plain.add_embeddings(paths, vectors[:2])
    with pytest.raises(InputError, match="not UTF-8"):
        plain.add_embeddings([os.fsdecode(b"\xff.jpg")], vectors[:1])
    # the files are known by size and mtime: adding them with the model embeds nothing
    assert sorted(Index(tmp_path / "e.idx", model=itm).add(folder).unchanged) == paths


# -- the ANN stage --------------------------------------------------------------------------------------------------
def test_ann_path_gives_the_brute_force_top_k(tmp_path, itm, folder, monkeypatch):
    paths = images_in(folder)
    rng = np.random.default_rng(0)
    # enough rows for the ANN to train on: the photos plus random unit vectors
    noise = rng.normal(size=(300, *itm.embed_images(paths[0])["image_embeds_proj"].shape[1:])).astype(
        np.float32
    )
    index = Index(tmp_path / "photos.idx", model=itm)
    index.add_embeddings([f"noise-{i}" for i in range(len(noise))], noise)
    monkeypatch.setattr(index_module, "BRUTE_FORCE_BELOW", 100)
    index.add(folder)
    assert index.info()["ann"]["present"]
    with_ann = index.search(text=TEXT, k=10)
    monkeypatch.setattr(index_module, "BRUTE_FORCE_BELOW", 10**9)
    exact = index.search(text=TEXT, k=10)
    assert [h.image for h in with_ann] == [h.image for h in exact]
    assert [h.score for h in with_ann] == [h.score for h in exact]
    # a filter that leaves few rows: all of them, exactly ranked, whatever the ANN proposes
    monkeypatch.setattr(index_module, "BRUTE_FORCE_BELOW", 100)
    narrow = Where(path="noise-1??")  # 100 rows: fewer of them among the ANN's candidates
    assert len(index.search(text=TEXT, k=100, where=narrow)) == 100


# -- crash safety -----------------------------------------------------------------------------------------------------
KILL_AFTER_FSYNC = """
import os, signal, sys
calls = 0
real = os.fsync
def fsync(fd):
    global calls
    real(fd)
    calls += 1
    if calls == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
os.fsync = fsync
from blip2.cli import main
main(sys.argv[2:])
"""


def killed_then_rerun(
    command: list[str], kill_at: int, total: int
) -> tuple[int, subprocess.CompletedProcess]:
    """`blip2 COMMAND` (an `index add ... --index INDEX`) killed at its `kill_at`-th fsync, then run again:
    (the images the index held after the kill, fewer than `total`; the rerun)."""
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FSYNC, str(kill_at), *command, "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    index = command[command.index("--index") + 1]
    before = len(Index(index)) if os.path.exists(os.path.join(index, "index.sqlite")) else 0
    assert before < total
    rerun = subprocess.run(
        [sys.executable, "-m", "blip2", *command], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    return before, rerun


@pytest.mark.parametrize("kill_at", [2, 5])
def test_add_killed_mid_run_then_rerun_completes_without_duplicates(
    tmp_path, retrieval_checkpoints, itm, photos, kill_at
):
    """`kill -9` right after an fsync of the store (the vectors of a batch on disk, their rows maybe not yet
    committed): the rerun completes the add, each file once, and the index equals one built in one go."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):  # 12 distinct files: each photo saved at several qualities
        Image.open(photos[i % 4]).save(folder / f"{i:02d}.jpg", quality=60 + i)
    command = [
        "index",
        "add",
        str(folder),
        "--index",
        str(tmp_path / "p.idx"),
        "-m",
        str(retrieval_checkpoints["plain"]),
    ]
    index = Index(tmp_path / "p.idx", model=itm)
    before, rerun = killed_then_rerun(command, kill_at, 12)
    assert f"{12 - before} added" in rerun.stderr and f"{before} unchanged" in rerun.stderr
    paths = images_in(folder)
    with open_store(tmp_path / "p.idx") as store:
        rows = store.rows()
        assert sorted(r.path for r in rows) == paths  # each once
        meta = store.meta()
        assert store.vectors().shape[0] == max(r.slot for r in rows) + 1
        assert os.path.getsize(tmp_path / "p.idx" / "vectors.f16") % (meta.num_query * meta.dim * 2) == 0
    hits = index.search(text=TEXT, k=12)
    expected, scores = brute_force(itm, paths, TEXT)
    assert [h.image for h in hits] == expected
    np.testing.assert_allclose([h.score for h in hits], scores, atol=FP16_ATOL)
