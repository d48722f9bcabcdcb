"""`Index.add` over the job inputs: image files, WebDataset tar shards and parquet / CSV tables, each read
once; members stored as SOURCE#KEY with their source and key; unchanged shards not read; changed shards
re-embedding only changed members; hostile members reported; an index of format 1 read and migrated; an
embed job's rows equal to `index add`'s; remove / prune of members; locators confined to their source."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_index import killed_then_rerun
from test_index_cli import run

from blip2 import ImageError
from blip2.errors import IndexFileError
from blip2.index import Index, locating
from blip2.index.store import Row, open_store
from blip2.jobs import inputs as inputs_module

TEXT = "a cat on a red couch"
FP16_ATOL = 2e-3  # fp16 storage moves a cosine by at most ~1e-3


@pytest.fixture
def variants(tmp_path, photos):
    """Ten distinct JPEG files: the sample photos saved at several qualities."""
    folder = tmp_path / "variants"
    folder.mkdir()
    paths = []
    for i in range(10):
        path = folder / f"v{i}.jpg"
        Image.open(photos[i % 4]).save(path, quality=60 + 3 * i)
        paths.append(path)
    return paths


def member(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    """A regular member holding `data`, or (None) a symbolic link to /etc/passwd."""
    info = tarfile.TarInfo(name)
    if data is None:
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        info.size = len(data)
    tar.addfile(info, None if data is None else io.BytesIO(data))


def write_shard(path, images: dict[str, bytes]) -> None:
    """A shard of one sample per key: `KEY.jpg` and `KEY.txt`."""
    with tarfile.open(path, "w") as tar:
        for key, data in images.items():
            member(tar, f"{key}.jpg", data)
            member(tar, f"{key}.txt", f"caption of {key}".encode())


def brute_force(model, named: dict[str, bytes], text: str) -> dict[str, float]:
    """{name: `Blip2.similarity` of its image bytes}: the reference scores."""
    names = list(named)
    scores = model.similarity([named[n] for n in names], text)[:, 0]
    return dict(zip(names, scores.tolist()))


def ranked(scores: dict[str, float]) -> list[str]:
    names = list(scores)
    order = torch.argsort(torch.tensor([scores[n] for n in names]), descending=True, stable=True)
    return [names[i] for i in order.tolist()]


@pytest.fixture
def mixed(tmp_path, variants):
    """Files, a shard, a parquet bytes table and a CSV of paths over the ten variants: (inputs, {stored name:
    image bytes})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [p.read_bytes() for p in variants]
    shard = tmp_path / "s.tar"
    write_shard(shard, {"a/000": data[2], "a/001": data[3], "a/002": data[4]})
    table = tmp_path / "t.parquet"
    rows = [{"key": f"k{i}", "jpg": data[i]} for i in (5, 6, 7)]
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=2)
    csv = tmp_path / "variants" / "list.csv"
    csv.write_text("path\nv8.jpg\nv9.jpg\n")
    names = {str(variants[0]): data[0], str(variants[1]): data[1]}
    names |= {f"{shard}#a/00{i}": data[2 + i] for i in range(3)}
    names |= {f"{table}#k{i}": data[i] for i in (5, 6, 7)}
    names |= {f"{csv}#v8.jpg": data[8], f"{csv}#v9.jpg": data[9]}
    return [str(variants[0]), str(variants[1]), str(shard), str(table), str(csv)], names


# -- one pipeline over every kind of input --------------------------------------------------------------------------
def add_counting_shards(index, given, monkeypatch):
    """`index.add(given)`, and the shards and tables it opened."""
    opened = []
    shard, table = inputs_module._shard, inputs_module._Table.open
    with monkeypatch.context() as patch:
        patch.setattr(inputs_module, "_shard", lambda path: opened.append(path) or shard(path))
        patch.setattr(inputs_module._Table, "open", lambda path, *a: opened.append(path) or table(path, *a))
        return index.add(given), opened


def test_files_shard_and_tables_search_equals_brute_force(tmp_path, counted, mixed, monkeypatch):
    model, calls = counted
    given, named = mixed
    index = Index(tmp_path / "i.idx", model=model)
    report = index.add(given)
    assert sorted(report.added) == sorted(named) and not report.skipped and len(calls) == len(named)
    expected = brute_force(model, named, TEXT)
    hits = index.search(text=TEXT, k=len(named))
    assert [h.image for h in hits] == ranked(expected)
    np.testing.assert_allclose([h.score for h in hits], [expected[h.image] for h in hits], atol=FP16_ATOL)
    by_name = {h.image: h for h in hits}
    shard_hit = by_name[f"{tmp_path / 's.tar'}#a/001"]
    assert (shard_hit.source, shard_hit.key) == (str(tmp_path / "s.tar"), "a/001")
    assert shard_hit.to_dict()["source"] == str(tmp_path / "s.tar") and shard_hit.to_dict()["key"] == "a/001"
    file_hit = by_name[given[0]]
    assert file_hit.source is None and "source" not in file_hit.to_dict()
    # each row reads back its own image's bytes, and its content hash is theirs
    with open_store(tmp_path / "i.idx") as store:
        for row in store.rows():
            assert locating.read_row(row) == named[row.path]
    # nothing changed: nothing embedded, the shard and the bytes table not even opened
    calls.clear()
    again, opened = add_counting_shards(index, given, monkeypatch)
    assert sorted(again.unchanged) == sorted(named) and not calls and opened == [str(given[4])]


def test_unchanged_shard_is_not_read_changed_shard_reembeds_only_changed_members(
    tmp_path, counted, variants, monkeypatch
):
    model, calls = counted
    data = [p.read_bytes() for p in variants]
    shard = tmp_path / "s.tar"
    write_shard(shard, {"000": data[0], "001": data[1], "002": data[2]})
    index = Index(tmp_path / "i.idx", model=model)
    assert len(index.add(str(shard)).added) == 3 and len(calls) == 3

    calls.clear()
    report, opened = add_counting_shards(index, [str(shard)], monkeypatch)
    assert len(report.unchanged) == 3 and not opened and not calls  # not opened at all

    # rewritten: 001 changed, 002 gone, 003 new, 000 the same bytes at another offset
    write_shard(shard, {"003": data[3], "000": data[0], "001": data[4]})
    os.utime(shard, (1e9, 1e9))
    report = index.add(str(shard))
    name = f"{shard}#"
    assert report.unchanged == [name + "000"] and report.reembedded == [name + "001"]
    assert report.added == [name + "003"] and len(calls) == 2
    assert len(index) == 4  # 002 is kept until prune
    with open_store(tmp_path / "i.idx") as store:
        assert locating.read_row(store.get(name + "000")) == data[0]  # its locator follows the new layout
    assert index.prune() == [name + "002"]
    expected = brute_force(model, {name + "000": data[0], name + "001": data[4], name + "003": data[3]}, TEXT)
    assert [h.image for h in index.search(text=TEXT, k=10)] == ranked(expected)


def test_hostile_members_are_skipped_with_exit_1_and_the_rest_indexed(
    capsys, tmp_path, variants, retrieval_checkpoints
):
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        member(tar, "good.jpg", variants[0].read_bytes())
        member(tar, "../escape.jpg", variants[1].read_bytes())
        member(tar, "link.jpg", None)
        member(tar, "junk.jpg", b"not an image at all")
        member(tar, "text-only.txt", b"no image in this sample")
    command = ["index", "add", shard, "--index", tmp_path / "b.idx", "-m", retrieval_checkpoints["plain"]]
    for attempt in range(2):  # a shard with failures is read again each time (and reported again)
        code, _, err = run(capsys, *command)
        assert code == 1, err
        for key in ("../escape", "link", "junk", "text-only"):
            assert f"{shard}#{key}" in err or f"{shard}: {key}" in err, (key, err)
        assert "Traceback" not in err
        assert ("1 added" if attempt == 0 else "1 unchanged") in err
    with open_store(tmp_path / "b.idx") as store:
        assert [row.path for row in store.rows()] == [f"{shard}#good"]


# -- remove, prune, add-embeddings ----------------------------------------------------------------------------------
def test_remove_a_member_a_shard_and_prune_a_gone_shard(tmp_path, itm, variants, monkeypatch):
    data = [p.read_bytes() for p in variants]
    write_shard(tmp_path / "s.tar", {"000": data[0], "001": data[1]})
    write_shard(tmp_path / "t.tar", {"000": data[2], "001": data[3]})
    index = Index(tmp_path / "i.idx", model=itm)
    index.add([str(tmp_path / "s.tar"), str(tmp_path / "t.tar"), str(variants[4])])
    monkeypatch.chdir(tmp_path)
    assert index.remove(["s.tar#001"]) == 1  # SOURCE#KEY, the source relative
    assert index.remove(["t.tar"]) == 2  # a shard: all its members
    assert sorted(r.image for r in index.search(text=TEXT, k=10)) == sorted(
        [str(variants[4]), f"{tmp_path / 's.tar'}#000"]
    )
    # a removed member comes back with the next add of its shard (the shard is read again)
    assert index.add(str(tmp_path / "s.tar")).added == [f"{tmp_path / 's.tar'}#001"]
    os.remove(tmp_path / "s.tar")
    assert sorted(index.prune()) == [f"{tmp_path / 's.tar'}#000", f"{tmp_path / 's.tar'}#001"]
    assert len(index) == 1


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_add_embeddings_of_an_embed_job_equals_index_add(
    capsys, tmp_path, itm, variants, retrieval_checkpoints, suffix
):
    data = [p.read_bytes() for p in variants]
    shard = tmp_path / "s.tar"
    write_shard(shard, {"000": data[0], "001": data[1], "002": data[2]})
    inputs = [str(shard), str(variants[5])]
    out = tmp_path / f"emb{suffix}"
    code, _, err = run(capsys, "embed", *inputs, "-m", retrieval_checkpoints["plain"], "-o", out)
    assert code == 0, err
    code, _, err = run(capsys, "index", "add-embeddings", out, "--index", tmp_path / "e.idx")
    assert code == 0, err
    Index(tmp_path / "a.idx", model=itm).add(inputs)

    def rows(index):
        with open_store(index) as store:
            vectors = store.vectors()
            facts = ("path", "hash", "size", "mtime", "source", "key", "locator")
            return {r.path: ([getattr(r, f) for f in facts], vectors[r.slot]) for r in store.rows()}

    from_job, from_add = rows(tmp_path / "e.idx"), rows(tmp_path / "a.idx")
    assert from_job.keys() == from_add.keys() == {f"{shard}#00{i}" for i in range(3)} | {str(variants[5])}
    for name in from_add:
        if name.startswith(str(shard)):  # (an image file's row keeps its vectors' hash, as before)
            assert from_job[name][0] == from_add[name][0]
        np.testing.assert_allclose(from_job[name][1], from_add[name][1], atol=1e-3)
    # the index made from the job then finds the shard unchanged: nothing read again, nothing embedded
    report = Index(tmp_path / "e.idx", model=itm).add(str(shard))
    assert sorted(report.unchanged) == sorted(n for n in from_add if n.startswith(str(shard)))


# -- format 1 indexes -----------------------------------------------------------------------------------------------
# The database of an index written before format 2 (blip2-index/1), statement for statement.
FORMAT_1 = (
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
    "CREATE TABLE images(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, "
    "size INTEGER NOT NULL, mtime REAL NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, "
    "slot INTEGER UNIQUE NOT NULL, caption TEXT, added REAL NOT NULL) STRICT",
    "CREATE INDEX images_hash ON images(hash)",
    "CREATE TABLE dead(slot INTEGER PRIMARY KEY) STRICT",
)


def write_format_1(folder, model, paths) -> None:
    """An index of `paths` as blip2-index/1 wrote it: the database and the fp16 vector file."""
    folder.mkdir()
    vectors = model.embed_images([str(p) for p in paths])["image_embeds_proj"].numpy().astype("<f2")
    (folder / "vectors.f16").write_bytes(vectors.tobytes())
    db = sqlite3.connect(folder / "index.sqlite")
    db.execute("PRAGMA journal_mode = WAL")
    for statement in FORMAT_1:
        db.execute(statement)
    q, d = vectors.shape[1:]
    meta = {"format": "blip2-index/1", "num_query": str(q), "dim": str(d), "model": "tiny"}
    meta |= {"fingerprint": "", "created": "1.0", "updated": "1.0", "slots": str(len(paths))}
    db.executemany("INSERT INTO meta VALUES (?, ?)", [*meta.items(), ("vectors", "vectors.f16")])
    for slot, path in enumerate(paths):
        info = os.stat(path)
        row = (str(path), "h", info.st_size, info.st_mtime, 1, 1, slot, None, 1.0)
        db.execute(
            "INSERT INTO images(path, hash, size, mtime, width, height, slot, caption, added) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )
    db.commit()
    db.close()


def test_an_index_of_format_1_is_read_then_migrated_by_a_writer(tmp_path, itm, variants):
    folder = tmp_path / "old.idx"
    write_format_1(folder, itm, variants[:3])
    named = {str(p): p.read_bytes() for p in variants[:3]}
    hits = Index(folder, model=itm).search(text=TEXT, k=10)  # a reader: read as is
    assert [h.image for h in hits] == ranked(brute_force(itm, named, TEXT))
    with sqlite3.connect(folder / "index.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() == ("blip2-index/1",)
    shard = tmp_path / "s.tar"
    write_shard(shard, {"000": variants[3].read_bytes()})
    report = Index(folder, model=itm).add([*map(str, variants[:3]), str(shard)])  # a writer: migrated
    assert sorted(report.unchanged) == sorted(named) and report.added == [f"{shard}#000"]
    with sqlite3.connect(folder / "index.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() == ("blip2-index/2",)
    named[f"{shard}#000"] = variants[3].read_bytes()
    hits = Index(folder, model=itm).search(text=TEXT, k=10)
    assert [h.image for h in hits] == ranked(brute_force(itm, named, TEXT))
    assert Index(folder).remove([str(variants[0])]) == 1 and len(Index(folder)) == 3


def test_a_format_1_database_that_claims_format_2_is_refused_not_migrated(tmp_path, itm, variants):
    folder = tmp_path / "old.idx"
    write_format_1(folder, itm, variants[:1])
    with sqlite3.connect(folder / "index.sqlite") as db:
        db.execute("UPDATE meta SET value = 'blip2-index/2' WHERE key = 'format'")
    for writable in (False, True):
        with pytest.raises(IndexFileError, match="expected 'blip2-index/1'"):
            open_store(folder, writable=writable)


# -- locators -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "locator, message",
    [
        ("{not json", "malformed locator"),
        ('{"member": [0, 99999999999]}', "malformed locator"),
        ('{"member": [-1, 10]}', "malformed locator"),
        ('{"member": [true, 10]}', "malformed locator"),
        ('{"cell": ["jpg", 99, 0]}', "cannot read its table cell"),
        ('{"file": "../../etc/passwd"}', "outside its table's folder"),
        ('{"file": "/etc/passwd"}', "malformed locator"),
        ('{"other": 1}', "malformed locator"),
        ('{"member": [0, 512]}', "changed since it was indexed"),  # the tar header's bytes: not the image
    ],
)
def test_a_crafted_locator_reads_nothing_outside_its_source(tmp_path, variants, locator, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_shard(tmp_path / "s.tar", {"000": variants[0].read_bytes()})
    pq.write_table(pa.Table.from_pylist([{"jpg": variants[0].read_bytes()}]), tmp_path / "t.parquet")
    source = str(tmp_path / ("t.parquet" if "cell" in locator or "file" in locator else "s.tar"))
    digest = hashlib.sha256(variants[0].read_bytes()).hexdigest()
    row = Row(f"{source}#000", digest, 0, 0.0, 0, 0, None, source, "000", locator, slot=0, added=0.0)
    with pytest.raises(ImageError, match=message):
        locating.read_row(row)


def test_stored_rows_and_hits_as_json_lines(capsys, tmp_path, variants, retrieval_checkpoints):
    write_shard(tmp_path / "s.tar", {"000": variants[0].read_bytes()})
    index = tmp_path / "c.idx"
    code, out, err = run(
        capsys, "index", "add", tmp_path / "s.tar", "--index", index, "-m", retrieval_checkpoints["plain"]
    )
    assert code == 0, err
    code, out, err = run(capsys, "search", TEXT, "--index", index, "--json")
    assert code == 0, err
    (line,) = [json.loads(x) for x in out.splitlines()]
    assert line["image"] == f"{tmp_path / 's.tar'}#000"
    assert (line["source"], line["key"]) == (str(tmp_path / "s.tar"), "000")
    code, _, err = run(capsys, "index", "add", tmp_path / "s.tar", "--index", index, "--column", "nope")
    assert code == 0, err  # --column concerns tables only
    (tmp_path / "t.csv").write_text("path\nx.jpg\n")
    code, _, err = run(capsys, "index", "add", tmp_path / "t.csv", "--index", index, "--column", "nope")
    assert code == 2 and "no column 'nope'" in err and "Traceback" not in err


# -- crash safety ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kill_at", [3, 6])
def test_add_of_a_shard_killed_mid_run_then_rerun_completes_without_duplicates(
    tmp_path, retrieval_checkpoints, itm, photos, kill_at
):
    """`kill -9` right after an fsync of the store: the rerun reads the shard again (it was not recorded as
    read completely), finds the committed members unchanged and adds the rest, each member once."""
    data = {}
    for i in range(12):  # 12 distinct members: each photo saved at several qualities
        out = io.BytesIO()
        Image.open(photos[i % 4]).save(out, format="JPEG", quality=60 + i)
        data[f"{i:02d}"] = out.getvalue()
    shard = tmp_path / "s.tar"
    write_shard(shard, data)
    index = tmp_path / "p.idx"
    command = ["index", "add", str(shard), "--index", str(index), "-m", str(retrieval_checkpoints["plain"])]
    before, rerun = killed_then_rerun(command, kill_at, 12)
    assert f"{12 - before} added" in rerun.stderr and f"{before} unchanged" in rerun.stderr
    named = {f"{shard}#{key}": image for key, image in data.items()}
    with open_store(index) as store:
        rows = store.rows()
        assert sorted(r.path for r in rows) == sorted(named)  # each once
        assert all(locating.read_row(r) == named[r.path] for r in rows)
    hits = Index(index, model=itm).search(text=TEXT, k=12)
    assert [h.image for h in hits] == ranked(brute_force(itm, named, TEXT))
