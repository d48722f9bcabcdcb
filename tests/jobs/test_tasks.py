"""`blip2 ask --out` and `blip2 classify --out` as jobs: rows equal the library API called directly, a re-run
skips what is done, and a change of questions or labels is refused."""

from __future__ import annotations

import json

import pytest
from job_helpers import GEN, read_rows, run

import blip2
from blip2.cli import main

QUESTIONS = ["what is it?", "how many?"]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_ask_rows_equal_the_api_and_resume_skips(capsys, checkpoints, photos, tmp_path, suffix):
    out = tmp_path / f"answers{suffix}"
    paths = [str(p) for p in photos[:2]]
    args = ["ask", *paths, "--question", QUESTIONS[0], "-q", QUESTIONS[1], "--out", str(out)]
    args += ["-m", str(checkpoints["opt"]), *GEN]
    code, stdout, err = run(capsys, *args)
    assert code == 0 and stdout == "" and "2 done, 0 skipped" in err
    model = blip2.load(checkpoints["opt"])
    rows = {row["source"]: row for row in read_rows(out)}
    for path in paths:
        expected = model.ask(path, QUESTIONS, num_beams=2, max_new_tokens=6)
        assert rows[path]["answers"] == [{"question": q, "answer": a} for q, a in zip(QUESTIONS, expected)]
        assert json.loads(rows[path]["options"])["questions"] == QUESTIONS
    code, _, err = run(capsys, *args)
    assert code == 0 and "0 done, 2 skipped" in err and len(read_rows(out)) == 2
    changed = [a if a != QUESTIONS[1] else "who?" for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(changed)
    assert exit_info.value.code != 0 and len(read_rows(out)) == 2


def test_ask_without_out_needs_questions(capsys, photos):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", str(photos[0])])
    assert exit_info.value.code == 2 and "QUESTIONS" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize("rerank", [False, True])
def test_classify_rows_equal_the_api_and_resume_skips(
    capsys, retrieval_checkpoints, photos, tmp_path, suffix, rerank
):
    out = tmp_path / f"labels{suffix}"
    path = str(retrieval_checkpoints["plain"])
    paths = [str(p) for p in photos[:2]]
    args = ["classify", *paths, "--labels", "cat, dog,car", "--out", str(out), "-m", path]
    args += ["--rerank"] if rerank else []
    code, stdout, err = run(capsys, *args)
    assert code == 0 and stdout == "" and "2 done, 0 skipped" in err
    model = blip2.load(path)
    rows = {row["source"]: row for row in read_rows(out)}
    for image in paths:
        expected = model.classify(image, ["cat", "dog", "car"], rerank=rerank)
        # parquet gives every record the `match` field (null without --rerank); the floats are exact
        assert [{k: v for k, v in row.items() if v is not None} for row in rows[image]["labels"]] == expected
    code, _, err = run(capsys, *args)
    assert code == 0 and "0 done, 2 skipped" in err and len(read_rows(out)) == 2
    with pytest.raises(SystemExit) as exit_info:
        main([a if a != "cat, dog,car" else "cat,dog" for a in args])
    assert exit_info.value.code != 0 and len(read_rows(out)) == 2


def test_classify_many_images_needs_out(capsys, photos):
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(photos[0]), str(photos[1]), "--labels", "cat,dog"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
