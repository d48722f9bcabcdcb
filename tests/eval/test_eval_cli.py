"""`blip2 eval caption|vqa|retrieval`: tables, --json, job outputs as results, and hostile files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from eval_fixtures import caption_fixture

from blip2.cli import main
from blip2.eval import datasets
from blip2.eval.run import evaluate_retrieval
from blip2.eval.tokenize import tokenize
from blip2.eval.vqa import Question, evaluate
from blip2.tasks.api import load_retrieval

pytest.importorskip("pycocoevalcap", reason="the oracle: pip install pycocoevalcap (the test extra)")


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def eval_caption(capsys, annotations: Path, results: Path, *more: str):
    """`blip2 eval caption -a ANNOTATIONS -r RESULTS MORE...`: (exit code, stdout, stderr)."""
    return run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(results), *more)


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def coco(tmp_path):
    """COCO caption annotations and results files of the caption fixture."""
    refs, cands = caption_fixture(2)
    images = [{"id": k, "file_name": f"COCO_val2014_{k:012d}.jpg"} for k in refs]
    anns = [{"image_id": k, "caption": c} for k, v in refs.items() for c in v]
    results = [{"image_id": k, "caption": v[0]} for k, v in cands.items()]
    annotations = write(tmp_path / "captions.json", {"images": images, "annotations": anns})
    return annotations, write(tmp_path / "results.json", results), refs, cands


def test_caption_table_and_json_equal_pycocoevalcap(coco, capsys, tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    annotations, results, refs, cands = coco
    out_file = tmp_path / "scores.json"
    code, out, err = eval_caption(capsys, annotations, results, "--no-meteor", "--json", str(out_file))
    assert code == 0, err
    result = json.loads(out_file.read_text())
    gts = {k: [tokenize(c) for c in v] for k, v in refs.items()}
    res = {k: [tokenize(c) for c in v] for k, v in cands.items()}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    expected = {f"BLEU-{n}": bleu[n - 1] for n in range(1, 5)}
    expected |= {"ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}
    for name, value in expected.items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-12)
        assert f"{100 * value:.2f}" in next(line for line in out.splitlines() if line.startswith(name + " "))
    assert result["metrics"]["METEOR"] == "n/a (skipped)"
    assert result["counts"] == {"annotated": 36, "evaluated": 36, "missing": 0, "failed": 0, "ignored": 0}
    assert set(result["per_image"]) == {str(k) for k in refs}
    assert "evaluated 36 of 36 annotated images" in err


def test_caption_json_on_stdout_and_meteor_unavailable(coco, capsys, tmp_path, monkeypatch):
    annotations, results, _, _ = coco
    monkeypatch.setenv("BLIP2_METEOR_JAR", str(tmp_path / "nope.jar"))
    code, out, _ = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(results), "--json", "-")
    assert code == 0
    assert json.loads(out)["metrics"]["METEOR"].startswith("n/a (")
    code, out, _ = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(results))
    assert code == 0 and "METEOR   n/a (" in out and "nope.jar: no such file" in out


def test_caption_results_from_a_caption_job(checkpoints, photos, capsys, tmp_path):
    """The rows of `blip2 caption --out` (JSONL and parquet) give the same scores as the same captions
    given as COCO results; images the annotations do not name are ignored."""
    refs = {name.stem: [f"a photo of {name.stem}", "an image"] for name in photos[:4]}
    karpathy = {
        "images": [
            {
                "filename": p.name,
                "cocoid": i,
                "split": "test",
                "sentences": [{"raw": r} for r in refs[p.stem]],
            }
            for i, p in enumerate(photos[:4])
        ]
        + [{"filename": "x.jpg", "cocoid": 99, "split": "train", "sentences": [{"raw": "x"}]}]
    }
    annotations = write(tmp_path / "dataset_coco.json", karpathy)
    scores = []
    for out in (tmp_path / "caps.jsonl", tmp_path / "caps.parquet"):
        code, _, err = run(
            capsys, "caption", *map(str, photos), "--out", str(out), "-m", str(checkpoints["opt"]), "--beams", "1",
            "--max-new-tokens", "5",
        )  # fmt: skip
        assert code == 0, err
        code, text, err = run(
            capsys, "eval", "caption", "-a", str(annotations), "-r", str(out), "--no-meteor", "--json", "-"
        )
        assert code == 0, err
        scores.append(json.loads(text))
    rows = [json.loads(line) for line in (tmp_path / "caps.jsonl").read_text().splitlines()]
    coco_results = [
        {"image_id": i, "caption": r["caption"]}
        for i, p in enumerate(photos[:4])
        for r in rows
        if r["source"] == str(p)
    ]
    code, text, _ = run(
        capsys,
        "eval",
        "caption",
        "-a",
        str(annotations),
        "-r",
        str(write(tmp_path / "r.json", coco_results)),
        "--no-meteor",
        "--json",
        "-",
    )
    assert scores[0]["metrics"] == scores[1]["metrics"] == json.loads(text)["metrics"]
    # photos[4] is not annotated: its row is ignored
    assert scores[0]["counts"] == {"annotated": 4, "evaluated": 4, "missing": 0, "failed": 0, "ignored": 1}


def test_missing_and_ignored_results_are_counted(coco, capsys, tmp_path):
    annotations, _, _, cands = coco
    results = [{"image_id": k, "caption": v[0]} for k, v in cands.items() if k < 30]
    results.append({"image_id": 1000, "caption": "an image of another split"})
    path = write(tmp_path / "partial.json", results)
    code, out, err = eval_caption(capsys, annotations, path, "--no-meteor", "--json", "-")
    assert code == 0
    assert json.loads(out)["counts"] == {
        "annotated": 36,
        "evaluated": 30,
        "missing": 6,
        "failed": 0,
        "ignored": 1,
    }
    assert (
        "evaluated 30 of 36 annotated images; 6 without a caption; 1 results for images not annotated" in err
    )


def vqa_files(tmp_path: Path):
    questions = [
        {"question_id": 1, "image_id": 42, "question": "What color is the cat?"},
        {"question_id": 2, "image_id": 42, "question": "How many cats?"},
        {"question_id": 3, "image_id": 7, "question": "Is it raining?"},
    ]
    annotations = [
        {
            "question_id": 1,
            "answers": [{"answer": a} for a in ["orange"] * 6 + ["brown"] * 4],
            "answer_type": "other",
        },
        {
            "question_id": 2,
            "answers": [{"answer": a} for a in ["2"] * 3 + ["3"] * 7],
            "answer_type": "number",
        },
        {"question_id": 3, "answers": [{"answer": "no"}] * 10, "answer_type": "yes/no"},
    ]
    return (
        write(tmp_path / "q.json", {"questions": questions}),
        write(tmp_path / "a.json", {"annotations": annotations}),
        [
            Question(a["question_id"], tuple(x["answer"] for x in a["answers"]), a["answer_type"])
            for a in annotations
        ],
    )


def test_vqa_from_results_json_and_from_an_ask_job(capsys, tmp_path):
    questions, annotations, expected_questions = vqa_files(tmp_path)
    predictions = {1: "Brown.", 2: "two", 3: "yes"}
    results = write(tmp_path / "r.json", [{"question_id": q, "answer": a} for q, a in predictions.items()])
    code, out, err = run(
        capsys, "eval", "vqa", "-q", str(questions), "-a", str(annotations), "-r", str(results), "--json", "-"
    )
    assert code == 0, err
    result = json.loads(out)
    expected = evaluate(expected_questions, predictions)
    assert result["metrics"]["accuracy"] == pytest.approx(expected["overall"])
    assert result["metrics"]["accuracy (number)"] == pytest.approx(0.9)
    # The same answers as the rows of an ask job (its JSONL format), images named by their COCO id.
    job = tmp_path / "answers.jsonl"
    rows = [
        {"source": "/d/COCO_val2014_000000000042.jpg", "answers": [
            {"question": "What color is the cat?", "answer": "Brown."}, {"question": "How many cats?", "answer": "two"}
        ], "error": None},
        {"source": "/d/COCO_val2014_000000000007.jpg", "answers": [{"question": "Is it raining?", "answer": "yes"}], "error": None},
        {"source": "/d/COCO_val2014_000000000008.jpg", "answers": None, "error": "truncated"},
        {"source": "/d/holiday.jpg", "answers": [{"question": "Is it raining?", "answer": "no"}], "error": None},
    ]  # fmt: skip
    job.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(
        capsys, "eval", "vqa", "-q", str(questions), "-a", str(annotations), "-r", str(job), "--json", "-"
    )
    assert code == 0, err
    assert json.loads(out)["metrics"] == result["metrics"]
    assert json.loads(out)["counts"] == {
        "annotated": 3,
        "evaluated": 3,
        "missing": 0,
        "failed": 0,
        "ignored": 2,
    }
    code, out, _ = run(capsys, "eval", "vqa", "-q", str(questions), "-a", str(annotations), "-r", str(job))
    assert out.splitlines()[0].split() == ["accuracy", f"{100 * expected['overall']:.2f}"]


def test_retrieval_command(retrieval_checkpoints, photos, capsys, tmp_path):
    entries = [{"image": p.name, "caption": [f"a photo of {p.stem}", "something"]} for p in photos]
    entries.append({"image": "uncaptioned.jpg", "caption": []})  # not evaluated
    annotations = write(tmp_path / "ann.json", entries)
    args = [
        "eval",
        "retrieval",
        "-a",
        str(annotations),
        "-i",
        str(photos[0].parent),
        "-m",
        str(retrieval_checkpoints["plain"]),
    ]
    code, out, err = run(capsys, *args, "--k", "3", "--json", "-")
    assert code == 0, err
    model = load_retrieval(retrieval_checkpoints["plain"], torch.device("cpu"), torch.float32)
    assert (
        json.loads(out)["metrics"] == evaluate_retrieval(model, annotations, photos[0].parent, k=3)["metrics"]
    )
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert out.splitlines()[1].startswith("ITC ") and out.splitlines()[2].startswith("ITC+ITM (top 128)")


# -- hostile and wrong files ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, words",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"images": [{"id": 1, "file_name": 5}], "annotations": []}', "images[0]: 'file_name' must be str"),
        (b'{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}', "annotations[0]: image_id 2 is not in 'images'"),
        (b'{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}', "annotations[0]: no 'caption' field"),
        (b'{"images": [{"id": true, "file_name": "a.jpg"}], "annotations": []}', "'id' must be int or str, got bool"),
        (b'{"images": [{"filename": "a.jpg", "split": "test", "sentences": "x"}]}', "images[0]: 'sentences' must be list, got str"),
        (b'{"images": [{"filename": "/etc/passwd", "split": "test", "sentences": []}]}', "not a relative path"),
        (b'[{"image": "../../x.jpg", "caption": "a"}]', "not a relative path"),
        (b'{"something": 1}', "not a COCO"),
        (b'[[[[' * 100_000, "not valid JSON"),
    ],
)  # fmt: skip
def test_bad_annotation_files_name_the_file_and_field(content, words, capsys, tmp_path):
    annotations = tmp_path / "ann.json"
    annotations.write_bytes(content)
    results = write(tmp_path / "r.json", [])
    code, out, err = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(results), "--no-meteor")
    assert code == 1 and out == ""
    assert str(annotations) in err and words in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "results, words",
    [
        ([{"image_id": 999, "caption": "x"}], "no caption for any image"),
        (
            [{"image_id": 0, "caption": "x"}, {"image_id": 0, "caption": "y"}],
            "a second caption for image_id 0",
        ),
        ([{"image_id": 0, "caption": None}], "[0]: 'caption' must be str"),
        ({"results": 1}, "'results' must be list"),
        ([], "no caption for any image"),
    ],
)
def test_bad_results_name_the_file(results, words, coco, capsys, tmp_path):
    annotations = coco[0]
    path = write(tmp_path / "bad.json", results)
    code, _, err = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(path), "--no-meteor")
    assert code == 1 and str(path) in err and words in err, err


def test_files_are_size_capped_and_must_be_regular(coco, capsys, tmp_path, monkeypatch):
    annotations, results, _, _ = coco
    monkeypatch.setattr(datasets, "MAX_FILE_BYTES", 100)
    code, _, err = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(results))
    assert code == 1 and str(annotations) in err and "larger than 100 bytes" in err
    monkeypatch.undo()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "eval", "caption", "-a", str(fifo), "-r", str(results))
    assert code == 1 and "is a FIFO" in err
    code, _, err = run(capsys, "eval", "caption", "-a", str(tmp_path / "missing.json"), "-r", str(results))
    assert code == 1 and "missing.json: not found" in err


def test_wrong_job_kind_and_bad_job_rows(coco, capsys, tmp_path):
    annotations = coco[0]
    job = tmp_path / "x.jsonl"
    job.write_text('{"source": "a.jpg", "caption": "x"}\nnot json\n')
    code, _, err = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(job), "--no-meteor")
    assert code == 1 and f"{job}:2: not a JSON line" in err
    (tmp_path / "x.jsonl.job.json").write_text(json.dumps({"version": 1, "task": "ask"}))
    code, _, err = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(job), "--no-meteor")
    assert code == 1 and "the output of a 'ask' job, not of 'caption'" in err
    folder = tmp_path / "y.parquet"
    folder.mkdir()
    (folder / "part-00000.parquet").write_bytes(b"PAR1 not really")
    code, _, err = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(folder), "--no-meteor")
    assert code == 1 and "part-00000.parquet: not a readable parquet part" in err
    (folder / "part-00000.parquet").unlink()
    os.mkfifo(folder / "part-00000.parquet")
    code, _, err = run(capsys, "eval", "caption", "-a", str(annotations), "-r", str(folder), "--no-meteor")
    assert code == 1 and "part-00000.parquet: not a regular file" in err


def test_retrieval_with_a_missing_image_names_it(retrieval_checkpoints, photos, capsys, tmp_path):
    entries = [{"image": "missing.jpg", "caption": "a"}, {"image": photos[0].name, "caption": "b"}]
    annotations = write(tmp_path / "ann.json", entries)
    args = ["-a", str(annotations), "-i", str(photos[0].parent), "-m", str(retrieval_checkpoints["plain"])]
    code, out, err = run(capsys, "eval", "retrieval", *args)
    assert code == 1 and out == "" and "missing.jpg" in err and "Traceback" not in err


def test_usage_errors(coco, capsys, tmp_path):
    annotations, results, _, _ = coco
    code, _, err = eval_caption(capsys, annotations, results, "--json", str(tmp_path / "no" / "x.json"))
    assert code == 2 and "--json" in err
    code, _, err = run(capsys, "eval", "retrieval", "-a", str(annotations), "-i", str(tmp_path / "none"))
    assert code == 2 and "is not a folder" in err
    code, _, err = run(capsys, "eval", "retrieval", "-a", str(annotations), "-i", str(tmp_path), "--k", "0")
    assert code == 2


def test_vqa_bad_results(capsys, tmp_path):
    questions, annotations, _ = vqa_files(tmp_path)
    twice = write(
        tmp_path / "twice.json", [{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}]
    )
    code, _, err = run(capsys, "eval", "vqa", "-q", str(questions), "-a", str(annotations), "-r", str(twice))
    assert code == 1 and f"{twice}: [1]: a second answer for question_id 1" in err
    bad = write(tmp_path / "a2.json", {"annotations": [{"question_id": 5, "answers": []}]})
    code, _, err = run(capsys, "eval", "vqa", "-q", str(questions), "-a", str(bad), "-r", str(twice))
    assert code == 1 and "annotations[0]: question_id 5 is not in" in err


def test_retrieval_reads_the_annotations_before_the_model(capsys, tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text('[{"image": "/abs.jpg", "caption": "x"}]')
    code, _, err = run(
        capsys, "eval", "retrieval", "-a", str(bad), "-i", str(tmp_path), "-m", str(tmp_path / "no-model")
    )
    assert code == 1 and f"{bad}: [0]: image file name '/abs.jpg' is not a relative path" in err
