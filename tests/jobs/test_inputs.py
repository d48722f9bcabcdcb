"""`blip2.jobs.inputs`: every kind of input expanded into items that read back the bytes the user put there
(compared with the files themselves), and hostile shards and tables as failed inputs or clear errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile

import pytest
from shards import add_member, write_shard, write_table

from blip2 import images
from blip2.errors import ImageError, InputError
from blip2.jobs.inputs import Failed, Item, brace_expand, expand_inputs


def expand(*inputs, **options):
    found = list(expand_inputs([str(i) for i in inputs], **options))
    assert [x.index for x in found] == list(range(len(found)))
    return [x for x in found if isinstance(x, Item)], [x for x in found if isinstance(x, Failed)]


@pytest.mark.parametrize(
    "pattern, names",
    [
        ("a{1..3}.tar", ["a1.tar", "a2.tar", "a3.tar"]),
        ("s/{00008..00011}.tar", ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{a,b}{1..2}", ["a1", "a2", "b1", "b2"]),
        ("x{a,{b,c}d}y", ["xay", "xbdy", "xcdy"]),
        ("{-1..1}", ["-1", "0", "1"]),
        ("plain.tar", ["plain.tar"]),
        ("{}{a}{", ["{}{a}{"]),
        ("a{b,}c", ["abc", "ac"]),
    ],
)
def test_brace_expand_is_the_shell_s(pattern, names):
    assert brace_expand(pattern) == names


def test_brace_expand_refuses_a_bomb():
    with pytest.raises(InputError, match="more than"):
        brace_expand("{0..99999999}")
    with pytest.raises(InputError, match="more than"):
        brace_expand("{0..999}{0..999}{0..9}")


def test_files_keep_the_order_and_reasons_of_find_images(tmp_path, photos):
    shutil.copy(photos[0], tmp_path / "b.jpg")
    shutil.copy(photos[1], tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("text")
    items, failed = expand(tmp_path)
    assert [i.source for i in items] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    assert all(i.key == i.source and i.extra == {} for i in items)
    assert items[0].read() == photos[1].read_bytes()
    assert [(f.source, f.key, f.reason) for f in failed] == [
        (str(tmp_path / "notes.txt"), str(tmp_path / "notes.txt"), "not an image (unknown content)")
    ]


def test_shards_by_brace_pattern_and_glob(tmp_path, photos):
    (tmp_path / "shards").mkdir()
    keys = [
        write_shard(tmp_path / "shards" / f"{n:05d}.tar", photos[n * 2 : n * 2 + 2], n * 2) for n in (0, 1)
    ]
    for pattern in ("shards/{00000..00001}.tar", "shards/*.tar"):
        items, failed = expand(tmp_path / pattern)
        assert failed == []
        assert [i.key for i in items] == keys[0] + keys[1]
        assert [os.path.basename(i.source) for i in items] == ["00000.tar"] * 2 + ["00001.tar"] * 2
        for n, item in enumerate(items):
            assert item.read() == photos[n].read_bytes()
            assert item.extra == {"txt": f"caption {n}", "json": json.dumps({"n": n, "url": f"http://x/{n}"})}
        assert pickle.loads(pickle.dumps(items)) == items  # sent to worker processes and Ray tasks


def test_a_missing_shard_of_a_pattern_is_a_failed_input(tmp_path, photos):
    write_shard(tmp_path / "1.tar", photos[:1])
    items, failed = expand(tmp_path / "{1..2}.tar")
    assert len(items) == 1 and [f.source for f in failed] == [str(tmp_path / "2.tar")]
    assert "No such file" in failed[0].reason


def test_hostile_and_broken_members_are_failed_inputs(tmp_path, photos):
    jpeg = photos[0].read_bytes()
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "good.jpg", jpeg)
        add_member(tar, "../escape.jpg", jpeg)
        add_member(tar, "/abs/olute.jpg", jpeg)
        add_member(tar, "deep/../../up.jpg", jpeg)
        add_member(tar, "link.jpg", b"", tarfile.SYMTYPE)
        add_member(tar, "textonly.txt", b"no image")
        add_member(tar, "badjson.jpg", jpeg)
        add_member(tar, "badjson.json", b"{not json")
        add_member(tar, "README", b"no extension: not a sample")
        add_member(tar, "last.jpg", jpeg)
    items, failed = expand(shard)
    assert [i.key for i in items] == ["good", "last"]
    assert items[1].read() == jpeg
    reasons = {f.key: f.reason for f in failed}
    assert "unsafe member name" in reasons["../escape"] and "unsafe member name" in reasons["/abs/olute"]
    assert "unsafe member name" in reasons["deep/../../up"]
    assert "not a regular file" in reasons["link"] and "no image member" in reasons["textonly"]
    assert "not valid JSON" in reasons["badjson"]
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path, photos):
    shard = tmp_path / "cut.tar"
    write_shard(shard, photos[:3])
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        third = tar.getmember("000002.jpg")
    shard.write_bytes(data[: third.offset_data + 100])  # cut inside the third image
    items, failed = expand(shard)
    assert [i.key for i in items] == ["000000", "000001"]
    assert [i.read() for i in items] == [p.read_bytes() for p in photos[:2]]
    assert any("truncated" in f.reason for f in failed)
    # A shard cut after it was expanded: reading the member says so, naming shard and key.
    item = expand(tmp_path / "cut.tar")[0][1]
    shard.write_bytes(data[: item.where.offset + 10])
    with pytest.raises(ImageError, match="cut.tar: 000001: truncated member"):
        item.read()


def test_not_a_tar_file(tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"\x00" * 100 + b"junk" * 500)
    items, failed = expand(tmp_path / "fake.tar")
    assert items == [] and len(failed) == 1 and "tar" in failed[0].reason


def test_a_member_over_the_size_limit_is_refused_unread(tmp_path, photos, monkeypatch):
    write_shard(tmp_path / "s.tar", photos[:2])
    monkeypatch.setattr(images, "MAX_FILE_BYTES", min(p.stat().st_size for p in photos[:2]) - 1)
    items, failed = expand(tmp_path / "s.tar")
    assert items == [] and all("more than the limit" in f.reason for f in failed)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_table_of_paths_relative_to_its_folder(tmp_path, photos, suffix):
    (tmp_path / "data" / "img").mkdir(parents=True)
    for photo in photos[:2]:
        shutil.copy(photo, tmp_path / "data" / "img" / photo.name)
    (tmp_path / "secret.jpg").write_bytes(photos[0].read_bytes())
    rows = [
        {"path": f"img/{photos[1].name}", "caption": "one", "n": "1"},
        {"path": f"img/{photos[0].name}", "caption": "two", "n": "2"},
        {"path": "../secret.jpg", "caption": "escape", "n": "3"},
        {"path": str(tmp_path / "secret.jpg"), "caption": "absolute", "n": "4"},
    ]
    table = tmp_path / "data" / f"table{suffix}"
    write_table(table, rows)
    notes: list[str] = []
    items, failed = expand(table, keep=["caption"], notes=notes)
    assert notes == [f"{table}: image paths from column 'path'"]
    assert [(i.source, i.key, i.extra) for i in items] == [
        (str(table), rows[0]["path"], {"caption": "one"}),
        (str(table), rows[1]["path"], {"caption": "two"}),
    ]
    assert [i.read() for i in items] == [photos[1].read_bytes(), photos[0].read_bytes()]
    assert "leads outside the table's folder" in failed[0].reason and "absolute path" in failed[1].reason


def test_a_parquet_table_of_bytes_with_keys(tmp_path, photos):
    import pyarrow as pa

    rows = [{"key": f"k{i}", "jpg": p.read_bytes(), "n": i} for i, p in enumerate(photos)]
    rows[2]["jpg"] = None
    write_table(tmp_path / "t.parquet", rows)  # row groups of 2: the cache is crossed
    notes: list[str] = []
    items, failed = expand(tmp_path / "t.parquet", keep=["n"], notes=notes)
    assert "image bytes from column 'jpg', keys from 'key'" in notes[0]
    assert [i.key for i in items] == [f"k{i}" for i in range(len(photos))]
    assert [i.extra for i in items] == [{"n": str(i)} for i in range(len(photos))]
    for item, photo in zip(items, photos):
        if item.key == "k2":
            with pytest.raises(ImageError, match="t.parquet: k2: no image bytes"):
                item.read()
        else:
            assert item.read() == photo.read_bytes()
    # Hugging Face datasets' image struct, and a named column
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("picture", struct)])
    write_table(
        tmp_path / "hf.parquet", [{"picture": {"bytes": photos[0].read_bytes(), "path": None}}], schema
    )
    items, _ = expand(tmp_path / "hf.parquet", column="picture")
    assert items[0].key == "0" and items[0].read() == photos[0].read_bytes()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_table_column_errors_are_clear(tmp_path, suffix):
    table = tmp_path / f"t{suffix}"
    write_table(table, [{"url": "http://x", "n": "1"}])
    with pytest.raises(InputError, match=r"no column 'picture' \(columns: url, n\)"):
        expand(table, column="picture")
    with pytest.raises(InputError, match="no image column found .* --column"):
        expand(table)
    with pytest.raises(InputError, match="no column 'nope' to keep"):
        expand(table, column="url", keep=["nope"])


def test_a_parquet_column_of_numbers_is_not_an_image_column(tmp_path):
    write_table(tmp_path / "t.parquet", [{"image": 3}])
    with pytest.raises(InputError, match="column 'image' holds int64"):
        expand(tmp_path / "t.parquet", column="image")


def test_a_damaged_table_is_a_clear_error(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(InputError, match="t.parquet: not a readable parquet file"):
        expand(tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_bytes(b"\xff\xfe bad")
    with pytest.raises(InputError, match="t.csv: not a readable CSV"):
        expand(tmp_path / "t.csv")


def test_kinds_mixed_in_one_job(tmp_path, photos):
    write_shard(tmp_path / "s.tar", photos[:1])
    write_table(tmp_path / "t.csv", [{"path": photos[1].name}])
    shutil.copy(photos[1], tmp_path / photos[1].name)
    items, failed = expand(tmp_path / "s.tar", tmp_path / photos[1].name, tmp_path / "t.csv", "nowhere.jpg")
    # the images find_images found first, then shards and tables in the order named, then the failures
    assert [(os.path.basename(i.source), i.key) for i in items] == [
        (photos[1].name, str(tmp_path / photos[1].name)),
        ("s.tar", "000000"),
        ("t.csv", photos[1].name),
    ]
    assert [f.source for f in failed] == ["nowhere.jpg"]


def test_a_shard_of_too_many_members_stops_at_the_cap(tmp_path, photos, monkeypatch):
    from blip2.jobs import inputs

    monkeypatch.setattr(inputs, "MAX_MEMBERS", 4)
    write_shard(tmp_path / "s.tar", photos[:2])  # 6 members: jpg, txt, json twice
    items, failed = expand(tmp_path / "s.tar")
    assert [i.key for i in items] == ["000000", "000001"]  # the second sample has its image only
    assert items[0].extra["txt"] == "caption 0" and items[1].extra == {}
    assert [f.reason for f in failed] == ["more than 4 members: the rest is not read"]
