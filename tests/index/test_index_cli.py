"""`blip2 index ...` and `blip2 search` on a tiny retrieval checkpoint: output formats, exit codes, the
library's results, no tracebacks."""

from __future__ import annotations

import json
import os

import pytest

from blip2.cli import main
from blip2.index import Index

TEXT = "a cat on a red couch"


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def built(capsys, tmp_path, folder, retrieval_checkpoints):
    """An index of the photos made by the command; returns its path."""
    index = tmp_path / "p.idx"
    code, _, err = run(capsys, "index", "add", folder, "--index", index, "-m", retrieval_checkpoints["plain"])
    assert code == 0, err
    return index


def test_add_reports_skipped_files_and_exits_1(capsys, tmp_path, folder, retrieval_checkpoints):
    data = (folder / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("hello")
    index = tmp_path / "p.idx"
    args = ["index", "add", folder, "--index", index, "-m", retrieval_checkpoints["plain"]]
    code, out, err = run(capsys, *args)
    assert code == 1 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert f"blip2: skipped: {folder / 'notes.txt'}: not an image (unknown content)" in lines
    assert any(line.startswith(f"blip2: skipped: {folder / 'truncated.jpg'}: ") for line in lines)
    assert lines[-1] == (
        f"blip2: {index}: 5 added, 0 re-embedded, 0 unchanged, 0 moved, 0 copied, 2 skipped; 5 images in all"
    )
    # again, with --json: one line per skipped file, then the counts; nothing embedded
    code, out, err = run(capsys, *args, "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and {r.get("skipped") is not None for r in records[:-1]} == {True}
    assert records[-1] == {
        "index": str(index),
        "added": 0,
        "reembedded": 0,
        "unchanged": 5,
        "moved": 0,
        "copied": 0,
        "skipped": 2,
        "count": 5,
    }


def test_a_relative_checkpoint_path_is_recorded_absolute(
    capsys, tmp_path, folder, retrieval_checkpoints, monkeypatch
):
    checkpoint = retrieval_checkpoints["plain"]
    monkeypatch.chdir(checkpoint.parent)
    code, _, err = run(capsys, "index", "add", folder, "--index", tmp_path / "r.idx", "-m", checkpoint.name)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)  # search from elsewhere, without --model: the recorded checkpoint loads
    code, out, err = run(capsys, "search", TEXT, "--index", "r.idx", "-k", "2", "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 2
    with Index(tmp_path / "r.idx") as index:
        assert index.meta().model == str(checkpoint.resolve())


def test_search_json_and_plain_equal_the_library(capsys, built, itm):
    code, out, err = run(capsys, "search", TEXT, "--index", built, "-k", 3, "--json")
    assert code == 0, err
    expected = Index(built, model=itm).search(text=TEXT, k=3)
    assert [json.loads(line) for line in out.splitlines()] == [h.to_dict() for h in expected]
    assert set(json.loads(out.splitlines()[0])) == {"rank", "image", "score"}
    code, out, _ = run(capsys, "search", TEXT, "--index", built, "-k", 3)
    assert out.splitlines() == [f"{h.rank}\t{h.score:.4f}\t{h.image}" for h in expected]


def test_search_rerank_and_image(capsys, built, itm, folder):
    code, out, err = run(
        capsys, "search", TEXT, "--index", built, "-k", 2, "--rerank", "--rerank-k", 4, "--json"
    )
    assert code == 0, err
    expected = Index(built, model=itm).search(text=TEXT, k=2, rerank=True, rerank_k=4)
    assert [json.loads(line) for line in out.splitlines()] == [h.to_dict() for h in expected]
    assert "match" in json.loads(out.splitlines()[0])
    code, out, err = run(capsys, "search", "--image", folder / "coffee.jpg", "--index", built, "-k", 1)
    assert code == 0 and out.split("\t")[-1].strip() == str(folder / "coffee.jpg")


def test_search_where_path(capsys, built, folder):
    code, out, _ = run(capsys, "search", TEXT, "--index", built, "--where-path", "*.png", "--json")
    assert code == 0 and [json.loads(line)["image"] for line in out.splitlines()] == [
        str(folder / "noise.png")
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--index", "IDX"], "give a TEXT"),
        (["search", TEXT, "--image", "x.jpg", "--index", "IDX"], "give a TEXT"),
        (["search", "--image", "x.jpg", "--rerank", "--index", "IDX"], "--rerank needs a TEXT"),
        (["search", TEXT, "--index", "IDX", "-k", "0"], "-k"),
    ],
)
def test_search_usage_errors(capsys, built, args, message):
    code, out, err = run(capsys, *[built if a == "IDX" else a for a in args])
    assert code == 2 and message in err and out == "" and "Traceback" not in err


def test_search_a_missing_index_fails_before_loading(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("blip2.cli.commands._load", lambda *a: pytest.fail("loaded a model"))
    code, out, err = run(capsys, "search", TEXT, "--index", tmp_path / "none.idx")
    assert code == 1 and "none.idx" in err and len(err.splitlines()) == 1


def test_search_with_another_checkpoint_is_an_error(capsys, built, retrieval_checkpoints):
    code, _, err = run(capsys, "search", TEXT, "--index", built, "-m", retrieval_checkpoints["image-token"])
    assert code == 2 and err.startswith("blip2: error:") and "made with another checkpoint" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_info_remove_prune(capsys, built, folder, retrieval_checkpoints):
    code, out, _ = run(capsys, "index", "info", built, "--json")
    info = json.loads(out)
    assert code == 0 and info["count"] == 5 and info["model"] == str(retrieval_checkpoints["plain"])
    assert info["dim"] == 16 and info["size_bytes"] > 0 and info["ann"] == {"present": False, "covered": 0}
    code, out, _ = run(capsys, "index", "info", built)
    assert code == 0 and "count\t5" in out.splitlines()

    code, _, err = run(capsys, "index", "remove", folder / "coffee.jpg", "--index", built)
    assert code == 0 and err.strip().endswith("1 removed; 4 images in all")
    os.remove(folder / "rocket.jpg")
    code, out, err = run(capsys, "index", "prune", "--index", built)
    assert code == 0 and out.splitlines() == [str(folder / "rocket.jpg")]
    assert err.strip().endswith("1 pruned; 3 images in all")


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_add_embeddings_from_blip2_embed(capsys, tmp_path, folder, retrieval_checkpoints, itm, suffix):
    out_file = tmp_path / f"emb{suffix}"
    images = sorted(str(p) for p in folder.iterdir())
    code, _, err = run(capsys, "embed", *images, "-m", retrieval_checkpoints["plain"], "-o", out_file)
    assert code == 0, err
    index = tmp_path / "e.idx"
    code, _, err = run(capsys, "index", "add-embeddings", out_file, "--index", index, "-m", "tiny-name")
    assert code == 0 and err.strip().endswith("5 embeddings added; 5 images in all")
    code, out, err = run(
        capsys, "search", TEXT, "--index", index, "-m", retrieval_checkpoints["plain"], "--json"
    )
    assert code == 0, err
    scores = itm.similarity(images, TEXT)[:, 0].tolist()
    ranked = sorted(images, key=lambda p: -scores[images.index(p)])
    assert [json.loads(line)["image"] for line in out.splitlines()] == ranked


def test_help_lists_the_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "index" in out and "search" in out
    code, out, _ = run(capsys, "index", "--help")
    assert code == 0 and all(
        c in out for c in ("add", "add-embeddings", "remove", "prune", "info", "Exit codes")
    )
