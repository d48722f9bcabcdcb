"""Finding image files: folders, globs, lists; content not extension; hidden, links, loops, special files."""

from __future__ import annotations

import os
import shutil

import pytest

from blip2.sources import MAX_LIST_LINE, find_images, image_signature


@pytest.fixture
def tree(tmp_path, photos):
    """photos/a.jpg, photos/sub/b.png, photos/sub/deeper/noext (a JPEG without extension), photos/notes.jpg
    (text), photos/.hidden.jpg, photos/.cache/c.jpg, photos/empty.png."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    shutil.copy(photos[0], root / "a.jpg")
    shutil.copy(photos[4], root / "sub" / "b.png")
    shutil.copy(photos[1], root / "sub" / "deeper" / "noext")
    shutil.copy(photos[2], root / ".hidden.jpg")
    shutil.copy(photos[2], root / ".cache" / "c.jpg")
    (root / "notes.jpg").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    return root


def names(paths, root):
    return [os.path.relpath(p, root) for p in paths]


def test_folder_recursive_by_content_hidden_skipped_silently(tree):
    found = find_images([tree])
    assert names(found.files, tree) == ["a.jpg", "sub/b.png", "sub/deeper/noext"]
    reasons = {os.path.relpath(s.path, tree): s.reason for s in found.skipped}
    assert reasons == {"notes.jpg": "not an image (unknown content)", "empty.png": "empty file"}


def test_single_files_globs_and_missing(tree):
    found = find_images(
        [
            tree / "sub" / "b.png",
            str(tree / "*.jpg"),
            str(tree / "**" / "noext"),
            tree / "nope.jpg",
            "zz*.jpg",
        ]
    )
    assert names(found.files, tree) == ["sub/b.png", "a.jpg", "sub/deeper/noext"]
    reasons = [(os.path.basename(s.path), s.reason) for s in found.skipped]
    assert reasons == [
        ("notes.jpg", "not an image (unknown content)"),
        ("nope.jpg", "no such file or folder"),
        ("zz*.jpg", "no file matches this pattern"),
    ]


def test_hidden_file_named_explicitly_is_taken(tree):
    assert find_images([tree / ".hidden.jpg"]).files == [str(tree / ".hidden.jpg")]


def test_each_file_once(tree):
    found = find_images([tree, tree / "a.jpg", str(tree / "sub")])
    assert names(found.files, tree) == ["a.jpg", "sub/b.png", "sub/deeper/noext"]


def test_symlink_loops_and_links_followed_once(tree, tmp_path):
    (tree / "sub" / "loop").symlink_to(tree)  # a link back up
    (tree / "again").symlink_to(tree / "sub")  # a second way into sub
    (tree / "link.jpg").symlink_to(tree / "a.jpg")
    (tree / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    found = find_images([tree])
    assert names(found.files, tree) == ["a.jpg", "again/b.png", "again/deeper/noext"]
    assert ("dangling.jpg", "broken symbolic link") in [
        (os.path.basename(s.path), s.reason) for s in found.skipped
    ]


def test_a_fifo_is_skipped_unopened(tree):
    os.mkfifo(tree / "pipe.jpg")
    found = find_images([tree, tree / "pipe.jpg"])  # opening it would block forever
    assert names(found.files, tree) == ["a.jpg", "sub/b.png", "sub/deeper/noext"]
    fifo = [s.reason for s in found.skipped if s.path.endswith("pipe.jpg")]
    assert fifo == ["not a regular file (a FIFO, device or socket)"] * 2


def test_list_file(tree, tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tree / 'a.jpg'}\n\n{tree / 'sub'}\r\n{tree / 'missing.jpg'}\n@{listing}\n")
    found = find_images([f"@{listing}"])
    assert names(found.files, tree) == ["a.jpg", "sub/b.png", "sub/deeper/noext"]
    assert [s.reason for s in found.skipped] == [
        "no such file or folder",
        "this list was already read (a list that includes itself?)",
    ]


def test_list_file_with_an_endless_line(tmp_path, tree):
    listing = tmp_path / "list.txt"
    listing.write_text("x" * (3 * MAX_LIST_LINE) + f"\n{tree / 'a.jpg'}\n")
    found = find_images([f"@{listing}"])
    assert names(found.files, tree) == ["a.jpg"]
    assert [s.reason for s in found.skipped] == [f"line longer than {MAX_LIST_LINE} characters"]


def test_unreadable_list_and_file(tmp_path, tree):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    (tree / "a.jpg").chmod(0)
    found = find_images([tree / "a.jpg", "@" + str(tmp_path / "none.txt")])
    assert found.files == []
    assert [s.reason for s in found.skipped][0].startswith("cannot read")


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"\xff\xd8\xff\xe0", True),
        (b"\x89PNG\r\n\x1a\n", True),
        (b"GIF89a", True),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", True),
        (b"\x00\x00\x00\x1cftypavif", True),
        (b"\x00\x00\x00\x1cftypisom", False),  # an MP4 video
        (b"%PDF-1.7", False),
        (b"%!PS-Adobe", False),  # EPS: never given to the decoder
        (b"", False),
    ],
)
def test_signatures(head, expected):
    assert image_signature(head) is expected
