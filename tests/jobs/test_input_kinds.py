"""Jobs over tar shards and tables through the real CLI on the tiny checkpoints: rows equal the library API
called on the image files themselves, keys and kept columns are in the rows, bad members are error rows,
a table without its column is refused before anything is written, an old output is refused clearly, and an
embed job's rows go into a search index that ranks as brute force does."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from job_helpers import GEN, read_rows, run
from shards import add_member, write_shard, write_table

import blip2


@pytest.fixture(scope="module")
def captions_of(checkpoints, photos):
    """The library's captions of each photo file: the oracle of every row."""
    model = blip2.load(checkpoints["opt"])
    paths = [str(p) for p in photos]
    return dict(zip(paths, model.caption(paths, num_beams=2, max_new_tokens=6)))


@pytest.fixture
def shards(tmp_path, photos):
    """Two good shards (brace-numbered) and a hostile one: '..' and absolute names, a link, a cut member."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "00000.tar", photos[:3], 0)
    write_shard(folder / "00001.tar", photos[3:], 3)
    jpeg = photos[0].read_bytes()
    with tarfile.open(folder / "bad.tar", "w") as tar:
        add_member(tar, "ok.jpg", jpeg)
        add_member(tar, "../up.jpg", jpeg)
        add_member(tar, "/etc/abs.jpg", jpeg)
        add_member(tar, "link.jpg", b"", tarfile.SYMTYPE)
        add_member(tar, "cut.jpg", jpeg)
    data = (folder / "bad.tar").read_bytes()
    with tarfile.open(folder / "bad.tar") as tar:
        cut = tar.getmember("cut.jpg")
    (folder / "bad.tar").write_bytes(data[: cut.offset_data + 200])
    return folder


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_caption_tar_shards_with_keys_text_and_json(capsys, checkpoints, photos, shards, captions_of, suffix):
    out = shards.parent / f"captions{suffix}"
    pattern = str(shards / "{00000..00001}.tar")
    args = [
        "caption",
        pattern,
        str(shards / "bad.tar"),
        "--out",
        str(out),
        "-m",
        str(checkpoints["opt"]),
        *GEN,
    ]
    code, stdout, err = run(capsys, *args)
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert f"{len(photos) + 1} done, 0 skipped (done before), 5 failed" in err  # ok.jpg done; 4 bad + cut
    rows = read_rows(out)
    assert sorted(row["index"] for row in rows) == list(range(len(rows)))
    good = [row for row in rows if row["error"] is None]
    for n, photo in enumerate(photos):
        [row] = [r for r in good if r["key"] == f"{n:06d}"]
        assert row["source"] == str(shards / ("00000.tar" if n < 3 else "00001.tar"))
        assert row["caption"] == captions_of[str(photo)]
        assert row["txt"] == f"caption {n}" and json.loads(row["json"]) == {"n": n, "url": f"http://x/{n}"}
        assert row["sha256"] is not None
    [ok] = [r for r in good if r["key"] == "ok"]
    assert ok["caption"] == captions_of[str(photos[0])] and ok["txt"] is None
    errors = {row["key"]: row["error"] for row in rows if row["error"] is not None}
    assert set(errors) == {"../up", "/etc/abs", "link", "cut", str(shards / "bad.tar")}
    assert "unsafe member name" in errors["../up"] and "truncated" in errors["cut"]
    assert not list(shards.parent.glob("**/up.jpg")) and not list(shards.parent.glob("**/abs.jpg"))
    # again: nothing to do, nothing written twice
    code, _, err = run(capsys, *args)
    assert code == 0 and f"0 done, {len(rows)} skipped" in err and read_rows(out) == rows


@pytest.mark.parametrize("table", ["bytes.parquet", "paths.csv"])
def test_caption_a_table_keeps_columns(capsys, checkpoints, photos, tmp_path, captions_of, table):
    (tmp_path / "img").mkdir()
    if table.endswith(".parquet"):
        rows = [{"key": f"k{i}", "jpg": p.read_bytes(), "url": f"u{i}"} for i, p in enumerate(photos)]
    else:
        rows = [{"filename": f"img/{p.name}", "url": f"u{i}"} for i, p in enumerate(photos)]
        for photo in photos:
            shutil.copy(photo, tmp_path / "img" / photo.name)
    write_table(tmp_path / table, rows)
    out = tmp_path / "captions.parquet"
    args = [
        "caption",
        str(tmp_path / table),
        "--keep",
        "url",
        "--out",
        str(out),
        "-m",
        str(checkpoints["opt"]),
    ]
    code, _, err = run(capsys, *args, *GEN)
    column = "'jpg', keys from 'key'" if table.endswith(".parquet") else "'filename'"
    assert code == 0 and f"from column {column}" in err
    found = sorted(read_rows(out), key=lambda row: row["index"])
    assert [row["url"] for row in found] == [f"u{i}" for i in range(len(photos))]
    assert [row["caption"] for row in found] == [captions_of[str(p)] for p in photos]
    keys = (
        [f"k{i}" for i in range(len(photos))] if table.endswith(".parquet") else [r["filename"] for r in rows]
    )
    assert [row["key"] for row in found] == keys


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_table_without_the_column_is_refused_before_anything(capsys, photos, tmp_path, suffix):
    write_table(tmp_path / f"t{suffix}", [{"url": "http://x"}])
    out = tmp_path / "captions.parquet"
    for extra in (["--column", "image"], []):
        args = [
            "caption",
            str(tmp_path / f"t{suffix}"),
            *extra,
            "--out",
            str(out),
            "-m",
            str(tmp_path / "none"),
        ]
        code, _, err = run(capsys, *args)
        assert code == 2 and "Traceback" not in err and err.count("\n") == 1
        assert ("no column 'image'" if extra else "no image column found") in err
        assert not out.exists()


def test_keep_may_not_replace_a_row_column(capsys, tmp_path):
    write_table(tmp_path / "t.csv", [{"path": "a.jpg", "caption": "x"}])
    out = tmp_path / "c.parquet"
    code, _, err = run(capsys, "caption", str(tmp_path / "t.csv"), "--keep", "caption", "--out", str(out))
    assert code == 2 and "--keep caption" in err and not out.exists()


def test_an_output_of_the_previous_version_is_refused(capsys, checkpoints, photos, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_text(json.dumps({"source": str(photos[0]), "index": 0, "sha256": "0" * 64}) + "\n")
    manifest = {"version": 1, "task": "caption", "model": str(checkpoints["opt"]), "options": {}}
    (tmp_path / "captions.jsonl.job.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "caption", str(photos[0]), "--out", str(out), "-m", str(checkpoints["opt"]))
    assert code == 1 and "earlier blip2" in err and "--overwrite" in err
    code, _, err = run(
        capsys, "caption", str(photos[0]), "--out", str(out), "--overwrite", "-m", str(checkpoints["opt"])
    )
    assert code == 0 and [row["key"] for row in read_rows(out)] == [str(photos[0])]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_embed_job_then_index_ranks_as_brute_force(capsys, retrieval_checkpoints, photos, tmp_path, suffix):
    from blip2.embeddings_io import read_embeddings

    model_path = str(retrieval_checkpoints["plain"])
    write_shard(tmp_path / "s.tar", photos[:2])
    files = [str(p) for p in photos[2:]]
    out = tmp_path / f"emb{suffix}"
    code, _, err = run(capsys, "embed", *files, str(tmp_path / "s.tar"), "-m", model_path, "-o", str(out))
    assert code == 0, err
    model = blip2.load(model_path)
    expected = model.embed_images([*files, *map(str, photos[:2])])["image_embeds_proj"].numpy()
    names, array = read_embeddings(out)
    assert names == [*files, f"{tmp_path / 's.tar'}#000000", f"{tmp_path / 's.tar'}#000001"]
    assert array.shape == expected.shape and np.abs(array - expected).max() < 1e-5
    row = read_rows(out)[0]
    assert set(row) >= {"source", "key", "sha256", "image_embeds_proj", "model", "options", "error"}

    index = tmp_path / "e.idx"
    code, _, err = run(capsys, "index", "add-embeddings", str(out), "--index", str(index), "-m", "tiny")
    assert code == 0 and f"{len(photos)} embeddings added" in err
    text = "a photo of a cat"
    code, stdout, err = run(capsys, "search", text, "--index", str(index), "-m", model_path, "--json")
    assert code == 0, err
    scores = model.similarity([*files, *map(str, photos[:2])], text)[:, 0].tolist()
    ranked = [name for _, name in sorted(zip(scores, names), key=lambda pair: -pair[0])]
    assert [json.loads(line)["image"] for line in stdout.splitlines()] == ranked


def test_embed_job_needs_a_retrieval_checkpoint(capsys, checkpoints, photos, tmp_path):
    code, _, err = run(
        capsys, "embed", str(photos[0]), "-m", str(checkpoints["opt"]), "-o", str(tmp_path / "e.parquet")
    )
    assert code == 2 and "retrieval checkpoint" in err
