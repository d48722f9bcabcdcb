"""Embedding files: lossless names, atomic and incremental writing, and hostile files refused by the reader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from blip2.embeddings_io import (
    PARQUET_ROW_GROUP,
    check_output_path,
    open_writer,
    path_fields,
    path_from_fields,
    read_embeddings,
    sidecar_path,
    valid_text,
)
from blip2.errors import InputError

ODD_NAMES = [
    "plain.jpg",
    "with\ttab.jpg",
    "with\nnewline.jpg",
    "back\\slash \\xe9.jpg",  # looks like an escape, is not one
    os.fsdecode(b"caf\xe9 latin-1.jpg"),  # not UTF-8: \udce9 in Python
    os.fsdecode(b"\xff\xfe.png"),
    "unicode \u00e9\u4e2d\U0001f600.jpg",
]


def rows(n, shape=(3, 4), seed=0):
    return list(np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32))


def write(path, names, vectors):
    writer = open_writer(path)
    for name, vector in zip(names, vectors):
        writer.append(name, vector)
    return writer.close()


@pytest.mark.parametrize("name", ["E.npy", "E.NPY", "E.parquet", "E.Parquet"])
def test_round_trip_keeps_every_name_exactly(tmp_path, name):
    vectors = rows(len(ODD_NAMES))
    assert write(tmp_path / name, ODD_NAMES, vectors) == (len(ODD_NAMES), 3, 4)
    paths, array = read_embeddings(tmp_path / name)
    assert paths == ODD_NAMES
    assert array.dtype == np.float32 and np.array_equal(array, np.stack(vectors))
    # The file is where it was asked for (not E.NPY.npy), and no temporary file is left behind.
    expected = {name, name + ".paths.jsonl"} if name.lower().endswith(".npy") else {name}
    assert set(os.listdir(tmp_path)) == expected
    umask = os.umask(0)
    os.umask(umask)
    assert {(tmp_path / f).stat().st_mode & 0o777 for f in expected} == {0o666 & ~umask}  # not private


def test_sidecar_is_valid_utf8_json_lines(tmp_path):
    write(tmp_path / "E.npy", ODD_NAMES, rows(len(ODD_NAMES)))
    lines = (tmp_path / "E.npy.paths.jsonl").read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(ODD_NAMES) + 1
    records = [json.loads(line) for line in lines[:-1]]
    assert [r["image"] for r in records][4] == "caf\\xe9 latin-1.jpg"
    assert ["image_bytes" in r for r in records] == [n != valid_text(n) for n in ODD_NAMES]


def test_path_fields_round_trip_and_valid_text():
    for name in ODD_NAMES:
        fields = path_fields(name)
        fields["image"].encode("utf-8")  # always encodable
        assert path_from_fields(json.loads(json.dumps(fields)), "x") == name
    assert valid_text("plain\ttext") == "plain\ttext"
    assert valid_text(os.fsdecode(b"a\xffb")) == "a\\xffb"
    assert valid_text("\ud800").encode("utf-8") == b"\\xed\\xa0\\x80"  # a surrogate that is no escaped byte


def test_many_rows_span_parquet_row_groups(tmp_path):
    names = [f"img{i}.jpg" for i in range(600)]
    vectors = rows(600, shape=(2, 3))
    write(tmp_path / "E.parquet", names, vectors)
    paths, array = read_embeddings(tmp_path / "E.parquet")
    assert paths == names and np.array_equal(array, np.stack(vectors))


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_rewrite_replaces_stale_files(tmp_path, suffix):
    out = tmp_path / f"E{suffix}"
    write(out, ["old1", "old2", "old3"], rows(3, seed=1))
    (tmp_path / f"E{suffix}.paths.txt").write_text("old1\nold2\nold3\n")  # an older blip2's sidecar
    write(out, ["new"], rows(1, seed=2))
    paths, array = read_embeddings(out)
    assert paths == ["new"] and np.array_equal(array, np.stack(rows(1, seed=2)))
    assert not (tmp_path / f"E{suffix}.paths.txt").exists() or suffix == ".parquet"


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_no_rows_removes_the_stale_output(tmp_path, suffix):
    out = tmp_path / f"E{suffix}"
    write(out, ["old"], rows(1))
    assert write(out, [], []) is None
    assert os.listdir(tmp_path) == []


def test_discard_leaves_the_destination_as_it_was(tmp_path):
    out = tmp_path / "E.npy"
    write(out, ["old"], rows(1))
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    writer = open_writer(out)
    writer.append("new", rows(1)[0])
    writer.discard()
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


def test_rows_of_another_shape_are_refused(tmp_path):
    writer = open_writer(tmp_path / "E.npy")
    writer.append("a", np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        writer.append("b", np.zeros((3, 2), np.float32))
    writer.discard()


def test_bad_destinations_are_refused_before_work(tmp_path):
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "side.npy.paths.jsonl").mkdir()
    cases = {
        "x.csv": ".npy or .parquet",
        "dir.npy": "is a directory",
        "side.npy": "is a directory",
        "missing/x.npy": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=message):
            check_output_path(tmp_path / name)


# -- hostile files --------------------------------------------------------------------------------------------
@pytest.fixture
def npy_pair(tmp_path):
    out = tmp_path / "E.npy"
    write(out, ["a.jpg", "b.jpg", "c.jpg"], rows(3))
    return out


def header(shape, descr="<f4"):
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_npy_header_claiming_more_rows_than_the_file_holds(npy_pair):
    data = npy_pair.read_bytes()
    npy_pair.write_bytes(header((10**12, 3, 4)) + data[len(header((3, 3, 4))) :])
    with pytest.raises(InputError, match="E.npy: not a readable .npy"):
        read_embeddings(npy_pair)


def test_npy_with_pickled_objects_is_refused_without_running_them(npy_pair, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # unpickling would create the marker file
            return (open, (str(marker), "w"))

    np.save(npy_pair, np.array([Payload()] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="E.npy"):
        read_embeddings(npy_pair)
    assert not marker.exists()


@pytest.mark.parametrize("array", [np.zeros((3, 4), np.int64), np.zeros(3, np.float32)])
def test_npy_of_the_wrong_kind(npy_pair, array):
    np.save(npy_pair, array)
    with pytest.raises(InputError, match="expected float32 rows"):
        read_embeddings(npy_pair)


@pytest.mark.parametrize(
    "sidecar, message",
    [
        (b'{"image": "a"}\n{"image": "b"}\n', "2 names for the 3 rows"),
        (b'{"image": "a"}\n' * 4, "more names than the 3 rows"),
        (b'{"image": "a"}\nnot json\n{"image": "c"}\n', "line 2 is not JSON"),
        (b'{"image": "a"}\n["b"]\n{"image": "c"}\n', "line 2: expected an object"),
        (b'{"image": "a"}\n{"image": "b", "image_bytes": "@@"}\n{"image": "c"}\n', "not base64"),
        (b'{"image": "a"}\n{"image": "\xff"}\n{"image": "c"}\n', "cannot read the image names"),
    ],
)
def test_npy_sidecar_that_does_not_fit(npy_pair, sidecar, message):
    sidecar_path(npy_pair).write_bytes(sidecar)
    with pytest.raises(InputError, match=message) as error:
        read_embeddings(npy_pair)
    assert "E.npy.paths.jsonl" in str(error.value)


def test_npy_without_its_sidecar(npy_pair):
    sidecar_path(npy_pair).unlink()
    with pytest.raises(InputError, match="E.npy.paths.jsonl"):
        read_embeddings(npy_pair)


@pytest.fixture
def parquet_table(tmp_path):
    out = tmp_path / "E.parquet"
    write(out, ["a.jpg", "b.jpg"], rows(2))
    import pyarrow.parquet as pq

    return out, pq.read_table(out)


def rewrite(out, table, metadata=None, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: columns.get(name, table.column(name)) for name in table.column_names}
    new = pa.table(arrays)
    new = new.replace_schema_metadata(table.schema.metadata if metadata is None else metadata)
    pq.write_table(new, out)


def test_parquet_with_bad_shape_metadata(parquet_table):
    out, table = parquet_table
    for metadata, message in [
        ({}, "no valid 'shape'"),
        ({"shape": "three,four"}, "no valid 'shape'"),
        ({"shape": "0,12"}, "bad row shape"),
        ({"shape": "5,4"}, "do not have the shape"),
    ]:
        rewrite(out, table, metadata)
        with pytest.raises(InputError, match=message) as error:
            read_embeddings(out)
        assert "E.parquet" in str(error.value)


def test_parquet_with_wrong_columns(parquet_table):
    import pyarrow as pa

    out, table = parquet_table
    rewrite(out, table, embedding=pa.array([[1.0] * 12, [2.0] * 12], pa.list_(pa.float64())))
    with pytest.raises(InputError, match="not a fixed-size list of float32"):
        read_embeddings(out)
    rewrite(out, table, image=pa.array(["a.jpg", None]))
    with pytest.raises(InputError, match="no image name"):
        read_embeddings(out)


@pytest.mark.parametrize("content", [b"", b"PAR1 not really", os.urandom(4096)])
def test_not_a_parquet_file(tmp_path, content):
    (tmp_path / "E.parquet").write_bytes(content)
    with pytest.raises(InputError, match="E.parquet: not a readable"):
        read_embeddings(tmp_path / "E.parquet")


def test_ctrl_c_during_a_row_waits_for_the_row(tmp_path, monkeypatch):
    import signal

    writer = open_writer(tmp_path / "E.npy")
    write_row = type(writer)._write

    def interrupted(self, path, vector):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a row
        write_row(self, path, vector)

    monkeypatch.setattr(type(writer), "_write", interrupted)
    # Ctrl-C as a terminal delivers it: a test process a shell started in the background inherits SIGINT
    # ignored (and Python keeps it so), where no KeyboardInterrupt would come at all.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            writer.append("a", rows(1)[0])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert writer.rows == 1  # the row was finished before the interrupt was raised
    writer.close()
    assert read_embeddings(tmp_path / "E.npy")[0] == ["a"]


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_file(tmp_path, suffix):
    from blip2.errors import Blip2Error

    out = tmp_path / f"E{suffix}"
    write(out, ["old"], rows(1))
    before = sorted(os.listdir(tmp_path))
    writer = open_writer(out)
    # Every write to /dev/full fails with ENOSPC: .npy writes through its open file, pyarrow opens the path.
    if suffix == ".npy":
        writer._data.close()
        writer._data = open("/dev/full", "wb", buffering=0)
    else:
        writer._temps[0].unlink()
        writer._temps[0].symlink_to("/dev/full")
    with pytest.raises(Blip2Error, match="cannot write: .*No space left on device") as error:
        for i in range(PARQUET_ROW_GROUP + 1):  # parquet writes a row group at a time
            writer.append(f"img{i}.jpg", rows(1)[0])
    assert f"E{suffix}" in str(error.value)
    assert writer.close() is None
    assert sorted(os.listdir(tmp_path)) == before and read_embeddings(out)[0] == ["old"]
