"""The resumable job runner through the real `blip2 caption --out` command, on the tiny OPT checkpoint:
rows equal `Blip2.caption`, bad files give error rows, a re-run skips what is done, a `kill -9` of a real
process loses nothing and doubles nothing, a change of options is refused, a torn JSONL line is cut."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from job_helpers import GEN, read_rows, run
from shards import add_member

import blip2


@pytest.fixture
def library(tmp_path, photos):
    """A folder of photos (nested, a hidden file, a text file and a truncated JPEG among them)."""
    root = tmp_path / "library"
    (root / "sub").mkdir(parents=True)
    for i, photo in enumerate(photos):
        shutil.copy(photo, (root if i % 2 else root / "sub") / photo.name)
    (root / ".hidden.jpg").write_bytes(photos[0].read_bytes())
    (root / "notes.txt").write_text("not an image\n")
    (root / "broken.jpg").write_bytes(photos[0].read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def reference(checkpoints):
    """Captions of the same images by the library API, the oracle of the job's rows."""
    model = blip2.load(checkpoints["opt"])

    def captions(paths):
        return dict(zip(paths, model.caption(paths, num_beams=2, max_new_tokens=6)))

    return captions


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_rows_equal_the_api_and_bad_files_are_error_rows(capsys, checkpoints, library, reference, suffix):
    out = library.parent / f"captions{suffix}"
    code, stdout, err = run(
        capsys, "caption", str(library), "--out", str(out), "--model", str(checkpoints["opt"]), *GEN
    )
    assert code == 1 and stdout == ""
    assert "5 done, 0 skipped (done before), 2 failed" in err
    rows = read_rows(out)
    by_source = {row["source"]: row for row in rows}
    assert len(rows) == len(by_source) == 7
    images = sorted(str(p) for p in library.rglob("*") if p.is_file() and p.suffix in (".jpg", ".png"))
    good = [p for p in images if not p.endswith(("broken.jpg", ".hidden.jpg"))]
    expected = reference(good)
    for path in good:
        assert by_source[path]["caption"] == expected[path]
        assert by_source[path]["error"] is None
        assert by_source[path]["model"] == str(checkpoints["opt"])
        assert json.loads(by_source[path]["options"])["num_beams"] == 2
    for name in ("broken.jpg", "notes.txt"):
        row = by_source[str(library / name)]
        assert row["caption"] is None and row["error"]
    assert sorted(row["index"] for row in rows) == list(range(7))

    # The same command again: everything is skipped, nothing is written twice.
    code, _, err = run(
        capsys, "caption", str(library), "--out", str(out), "--model", str(checkpoints["opt"]), *GEN
    )
    assert code == 0 and "0 done, 7 skipped (done before), 0 failed" in err
    assert read_rows(out) == rows


def test_other_options_are_refused_unless_overwrite(capsys, checkpoints, library):
    out = library.parent / "captions.parquet"
    args = ["caption", str(library / "sub"), "--out", str(out), "--model", str(checkpoints["opt"])]
    assert run(capsys, *args, *GEN)[0] == 0
    code, _, err = run(capsys, *args, "--beams", "1", "--max-new-tokens", "6")
    assert code == 1 and "written by another job" in err and "--overwrite" in err
    # Checked before the model is loaded: a model that does not exist is not even looked for.
    code, _, err = run(capsys, *args[:-1], str(library / "no-such-model"), *GEN)
    assert code == 1 and "written by another job (model:" in err
    code, _, err = run(capsys, *args, "--beams", "1", "--max-new-tokens", "6", "--overwrite")
    assert code == 0 and "0 skipped" in err
    assert {json.loads(row["options"])["num_beams"] for row in read_rows(out)} == {1}


def test_not_a_job_output_is_refused(capsys, checkpoints, library):
    out = library.parent / "mine.jsonl"
    out.write_text('{"something": "else"}\n')
    code, _, err = run(capsys, "caption", str(library), "--out", str(out), "--model", str(checkpoints["opt"]))
    assert code == 1 and "not the output of a blip2 job" in err
    assert out.read_text() == '{"something": "else"}\n'


def test_overwrite_never_empties_a_folder_holding_other_files(capsys, checkpoints, library):
    out = library.parent / "captions.parquet"
    args = ["caption", str(library / "sub"), "--out", str(out), "--model", str(checkpoints["opt"]), *GEN]
    assert run(capsys, *args)[0] == 0
    (out / "notes.txt").write_text("mine")  # a user's file that happens to sit in the output folder
    code, _, err = run(capsys, *args[:-4], "--beams", "1", "--max-new-tokens", "6", "--overwrite")
    assert code == 1 and "holds others (notes.txt)" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "_job.json").exists()


def test_a_torn_jsonl_line_is_cut_and_its_row_written_again(capsys, checkpoints, library, reference):
    out = library.parent / "captions.jsonl"
    args = ["caption", str(library / "sub"), "--out", str(out), "--model", str(checkpoints["opt"]), *GEN]
    assert run(capsys, *args)[0] == 0
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    out.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # a kill in the middle of the last line
    code, _, err = run(capsys, *args)
    assert code == 0 and "1 done, 2 skipped" in err
    rows = read_rows(out)
    assert sorted(row["source"] for row in rows) == sorted(str(p) for p in (library / "sub").iterdir())
    expected = reference([row["source"] for row in rows])
    assert all(row["caption"] == expected[row["source"]] for row in rows)


def many_inputs(tmp_path, photos, kind):
    """20 images (the same content under other names are other inputs) as files in a folder or as the
    samples of one tar shard: (what to name on the command line, {(source, key): the photo it holds})."""
    photo_of = {}
    if kind == "folder":
        root = tmp_path / "many"
        root.mkdir()
        for copy in range(4):
            for photo in photos:
                shutil.copy(photo, root / f"{copy}-{photo.name}")
                photo_of[(str(root / f"{copy}-{photo.name}"),) * 2] = str(photo)
        return root, photo_of
    shard = tmp_path / "many.tar"
    with tarfile.open(shard, "w") as tar:
        for copy in range(4):
            for photo in photos:
                add_member(tar, f"{copy}-{photo.name}", photo.read_bytes())
                photo_of[(str(shard), f"{copy}-{photo.stem}")] = str(photo)
    return shard, photo_of


@pytest.mark.parametrize("kind", ["folder", "tar"])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_kill_9_then_resume_loses_nothing_and_doubles_nothing(
    checkpoints, photos, tmp_path, reference, suffix, kind
):
    """A real process killed with SIGKILL after its first committed chunk, then the same command again."""
    root, photo_of = many_inputs(tmp_path, photos, kind)
    out = tmp_path / f"captions{suffix}"
    command = [sys.executable, "-m", "blip2", "caption", str(root), "--out", str(out)]
    command += ["--model", str(checkpoints["opt"]), "--chunk-size", "2", "--batch-size", "1", *GEN]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    committed = (
        (lambda: any(out.glob("part-*")))
        if suffix == ".parquet"
        else (lambda: out.exists() and out.stat().st_size)
    )
    deadline = time.monotonic() + 120
    while not committed() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the job finished before it was killed"
    before = read_rows(out)
    assert 0 < len(before) < 20

    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert f"{len(before)} skipped" in finished.stderr
    rows = read_rows(out)
    assert sorted((row["source"], row["key"]) for row in rows) == sorted(photo_of)  # each input once
    assert sorted(row["index"] for row in rows) == list(range(20))
    expected = reference(sorted(set(photo_of.values())))
    for row in rows:
        assert row["error"] is None and row["caption"] == expected[photo_of[row["source"], row["key"]]]
    for row in before:  # rows committed before the kill are kept as they were
        assert row in rows


@pytest.mark.parametrize(
    "damage",
    [
        ("captions.parquet/part-00001.parquet", b"PAR1 not really parquet"),
        ("captions.parquet/_job.json", b"\x00\x01 not json"),
        ("captions.parquet/_job.json", b'{"version": 99}'),
    ],
)
def test_a_damaged_output_is_a_clear_error(capsys, checkpoints, library, damage):
    out = library.parent / "captions.parquet"
    args = ["caption", str(library / "sub"), "--out", str(out), "--model", str(checkpoints["opt"]), *GEN]
    assert run(capsys, *args)[0] == 0
    name, content = damage
    (library.parent / name).write_bytes(content)
    code, _, err = run(capsys, *args)
    assert code == 1 and name.split("/")[1] in err and "Traceback" not in err


def test_a_crafted_jsonl_row_is_a_clear_error(capsys, checkpoints, library):
    out = library.parent / "captions.jsonl"
    args = ["caption", str(library / "sub"), "--out", str(out), "--model", str(checkpoints["opt"]), *GEN]
    assert run(capsys, *args)[0] == 0
    with open(out, "a") as f:
        f.write('{"source": "x", "sha256": ["unhashable"]}\n')
    code, _, err = run(capsys, *args)
    assert code == 1 and "captions.jsonl:4: not a row of a blip2 job" in err


def test_a_part_left_half_written_by_a_kill_is_removed_unread(capsys, checkpoints, library):
    out = library.parent / "captions.parquet"
    args = ["caption", str(library / "sub"), "--out", str(out), "--model", str(checkpoints["opt"]), *GEN]
    assert run(capsys, *args)[0] == 0
    rows = read_rows(out)
    stale = out / ".part-00001.parquet.tmp"
    stale.write_bytes(b"PAR1 half a part")
    code, _, err = run(capsys, *args)
    assert code == 0 and "0 done, 3 skipped" in err
    assert not stale.exists() and read_rows(out) == rows
    assert sorted(p.name for p in out.iterdir()) == ["_job.json", "part-00000.parquet"]


def test_run_job_through_the_library_api(tmp_path, library):
    """run_job with a stand-in task (the file's size as its 'caption'): chunks, progress, error rows."""
    from blip2.errors import ImageError
    from blip2.jobs import Job, open_job, run_job

    def prepare(data):  # the bytes, read once: broken.jpg is the 300-byte one
        if len(data) == 300:
            raise ImageError("<bytes>", "broken on purpose")
        return len(data)

    job = Job("size", "none", {"k": 1}, {"caption": "string"})
    calls = []
    summary = run_job(
        [str(library)],
        open_job(str(tmp_path / "sizes.jsonl"), job),
        job,
        prepare,
        lambda sizes: [{"caption": str(size)} for size in sizes],
        batch_size=2,
        chunk_size=2,
        progress=lambda handled, total: calls.append((handled, total)),
    )
    assert (summary.done, summary.failed, summary.skipped) == (5, 2, 0)
    assert calls == [(2, 6), (4, 6), (6, 6)]  # 6 image files (broken.jpg among them), notes.txt after
    rows = read_rows(tmp_path / "sizes.jsonl")
    for row in rows:
        if row["error"] is None:
            assert row["caption"] == str(os.path.getsize(row["source"]))
    assert {row["error"] for row in rows} - {None} == {"broken on purpose", "not an image (unknown content)"}


def test_each_input_is_read_once_per_run(tmp_path, library, monkeypatch):
    """Read, hashed and decoded from the same bytes: one read per input, also when a re-run skips it."""
    from blip2.jobs import Job, inputs, open_job, run_job

    reads, read = [], inputs.FileAt.read
    monkeypatch.setattr(inputs.FileAt, "read", lambda self, name: reads.append(self.path) or read(self, name))
    job = Job("size", "none", {}, {"caption": "string"})
    for _ in range(2):
        reads.clear()
        run_job(
            [str(library)],
            open_job(str(tmp_path / "sizes.parquet"), job),
            job,
            lambda data: len(data),
            lambda sizes: [{"caption": str(size)} for size in sizes],
            batch_size=2,
            chunk_size=3,
        )
        images = [str(p) for p in sorted(library.rglob("*.jpg")) if not p.name.startswith(".")]
        images += [str(p) for p in sorted(library.rglob("*.png"))]
        assert sorted(reads) == sorted(images)
    rows = read_rows(tmp_path / "sizes.parquet")
    assert all(row["caption"] == str(os.path.getsize(row["source"])) for row in rows if row["error"] is None)
