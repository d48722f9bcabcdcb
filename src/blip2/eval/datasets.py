"""Reading evaluation data: annotation files and results, as hostile input.

Every file is read through `blip2.files` (a regular file, at most `MAX_FILE_BYTES`, UTF-8), parsed as JSON
(or JSONL, or the parquet parts of a job's output), and checked field by field: a problem is a `DataError`
whose message names the file, the entry and the field. Image file names from annotations are kept inside
the image folder (no absolute names, no `..`).

Formats:
- captions, COCO: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
- captions, Karpathy split: {"images": [{"filename", "filepath"?, "cocoid"?, "split", "sentences": [{"raw"}]}]}
- captions, LAVIS's annotation lists: [{"image": "val2014/x.jpg", "caption": "..." or ["...", ...]}]
- caption results: COCO results [{"image_id", "caption"}], or a `blip2 caption ... --out` job's output
  (a .parquet folder or a .jsonl file), matched to the annotations' images by file name
- VQA (v2): questions {"questions": [{"question_id", "image_id", "question"}]}, annotations {"annotations":
  [{"question_id", "answers": [{"answer"}], "answer_type"}]}; results [{"question_id", "answer"}] or a
  `blip2 ask ... --out` job's output, matched by COCO image id (the digits ending the file name) and the
  question's text
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import Blip2Error, CheckpointError
from ..files import read_text
from .vqa import Question

MAX_FILE_BYTES = 1 << 30  # VQAv2's train annotations are ~330 MB; a file past this is not an annotation file
MAX_PARTS = 100_000  # parquet parts in a job's output folder


class DataError(Blip2Error):
    """An annotation or result file is unreadable or not in a format we read; the message names the file
    and, where it can, the entry and the field."""


@dataclass
class CaptionData:
    """Reference captions per image, and each image's file name (relative to the image folder)."""

    refs: dict[Hashable, list[str]] = field(default_factory=dict)
    files: dict[Hashable, str] = field(default_factory=dict)


# -- files --------------------------------------------------------------------------------------------------
def read_json_file(path: str | Path) -> Any:
    """The JSON value in `path`, size-capped (see the module doc)."""
    file = Path(path)
    try:
        text = read_text(file, MAX_FILE_BYTES)
    except CheckpointError as e:  # blip2.files names the file and says what is wrong with it
        raise DataError(str(e)) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{file}: not valid JSON ({str(e)[:120]})") from None


def _get(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`entry[key]`, which must be of `kind` (bool is not an int here)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{where}: no {key!r} field")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{where}: {key!r} must be {names}, got {type(value).__name__}")
    return value


def _list(value: Any, key: str, where: str) -> list:
    if isinstance(value, dict):
        value = _get(value, key, list, where)
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of {key}, got {type(value).__name__}")
    return value


def safe_name(name: str, where: str) -> str:
    """An image's path relative to the image folder: no absolute path, no `..`, no NUL."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or "\0" in name or pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{where}: image file name {name!r} is not a relative path inside the image folder")
    return str(pure)


# -- caption annotations ------------------------------------------------------------------------------------
def read_caption_annotations(path: str | Path, split: str | None = None) -> CaptionData:
    """Reference captions from a COCO, Karpathy or LAVIS annotation file (see the module doc). `split`
    selects the Karpathy split (test, val, train, restval); the other formats hold one split already."""
    data = read_json_file(path)
    if isinstance(data, list):
        out = _lavis_captions(data, str(path))
    elif isinstance(data, dict) and "annotations" in data:
        out = _coco_captions(data, str(path))
    elif isinstance(data, dict) and "images" in data:
        out = _karpathy_captions(data, str(path), split)
    else:
        raise DataError(
            f"{path}: not a COCO (images + annotations), Karpathy (images with sentences) or LAVIS file"
        )
    if not out.refs:
        raise DataError(
            f"{path}: no image with a reference caption" + (f" in split {split!r}" if split else "")
        )
    return out


def _coco_captions(data: dict, where: str) -> CaptionData:
    out = CaptionData()
    for i, image in enumerate(_list(data, "images", where)):
        at = f"{where}: images[{i}]"
        key = _get(image, "id", (int, str), at)
        out.files[key] = safe_name(_get(image, "file_name", str, at), at)
    for i, ann in enumerate(_list(data, "annotations", where)):
        at = f"{where}: annotations[{i}]"
        key = _get(ann, "image_id", (int, str), at)
        if key not in out.files:
            raise DataError(f"{at}: image_id {key!r} is not in 'images'")
        out.refs.setdefault(key, []).append(_get(ann, "caption", str, at))
    return out


def _karpathy_captions(data: dict, where: str, split: str | None) -> CaptionData:
    out = CaptionData()
    for i, image in enumerate(_list(data, "images", where)):
        at = f"{where}: images[{i}]"
        if split is not None and _get(image, "split", str, at) != split:
            continue
        name = _get(image, "filename", str, at)
        folder = image.get("filepath", "")
        if not isinstance(folder, str):
            raise DataError(f"{at}: 'filepath' must be str, got {type(folder).__name__}")
        key = image.get("cocoid", image.get("imgid", name))
        if not isinstance(key, (int, str)) or isinstance(key, bool) or key in out.files:
            raise DataError(f"{at}: its id ({key!r}) is not a number or text, or repeats another image's")
        out.files[key] = safe_name(f"{folder}/{name}" if folder else name, at)
        sentences = _list(image, "sentences", at)
        raw = [_get(s, "raw", str, f"{at}.sentences[{j}]") for j, s in enumerate(sentences)]
        if raw:  # an image without a caption is not evaluated
            out.refs[key] = raw
    return out


def _lavis_captions(data: list, where: str) -> CaptionData:
    out = CaptionData()
    for i, entry in enumerate(data):
        at = f"{where}: [{i}]"
        name = safe_name(_get(entry, "image", str, at), at)
        captions = _get(entry, "caption", (str, list), at)
        for j, caption in enumerate([captions] if isinstance(captions, str) else captions):
            if not isinstance(caption, str):
                raise DataError(f"{at}: caption[{j}] must be str, got {type(caption).__name__}")
            out.refs.setdefault(name, []).append(caption)
        out.files[name] = name
    return out


# -- caption results ----------------------------------------------------------------------------------------
@dataclass
class Found:
    """Results matched to annotated items (image keys or question ids), with what could not be used: job
    rows that failed (their item has no result) and results for items not evaluated (not annotated, or
    in another split), which are ignored."""

    results: dict[Any, str] = field(default_factory=dict)
    failed: int = 0
    ignored: int = 0


def read_caption_results(path: str | Path, annotations: CaptionData) -> Found:
    """One caption per annotated image, from COCO results JSON or a caption job's output (see `Found`)."""
    if _is_job_output(path):
        rows = [
            (source, _get(row, "caption", (str, type(None)), where), row.get("error"))
            for source, row, where in _job_rows(path, "caption")
        ]
        return _by_file_name(rows, annotations, str(path))
    found = Found()
    for i, entry in enumerate(_list(read_json_file(path), "results", str(path))):
        at = f"{path}: [{i}]"
        key = _get(entry, "image_id", (int, str), at)
        caption = _get(entry, "caption", str, at)
        _add(found, key, caption, key in annotations.refs, f"{at}: a second caption for image_id {key!r}")
    return found


def _add(found: Found, key: Any, result: str, wanted: bool, twice: str) -> None:
    if not wanted:
        found.ignored += 1
    elif key in found.results:
        raise DataError(twice)
    else:
        found.results[key] = result


def _by_file_name(rows: list[tuple[str, str | None, Any]], annotations: CaptionData, where: str) -> Found:
    """Job rows (source path, caption, error) matched to annotated images by file name (the path's last
    part). Rows of other files are ignored: a job may have captioned a whole folder."""
    by_name: dict[str, Hashable] = {}
    for key, name in annotations.files.items():
        if key in annotations.refs:
            by_name.setdefault(PurePosixPath(name).name, key)
    found = Found()
    for source, caption, error in rows:
        name = PurePosixPath(source.replace("\\", "/")).name
        key = by_name.get(name)
        if key is not None and (caption is None or error is not None):
            found.failed += 1
        else:
            _add(found, key, caption or "", key is not None, f"{where}: two rows for the image file {name!r}")
    return found


# -- VQA ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VqaQuestion(Question):
    image_id: int = 0


def read_vqa(questions_path: str | Path, annotations_path: str | Path) -> list[VqaQuestion]:
    """The annotated questions of a VQA (v2) split: text and image from the questions file, answers from
    the annotations."""
    texts: dict[int, tuple[str, int]] = {}
    for i, q in enumerate(_list(read_json_file(questions_path), "questions", str(questions_path))):
        at = f"{questions_path}: questions[{i}]"
        texts[_get(q, "question_id", int, at)] = (_get(q, "question", str, at), _get(q, "image_id", int, at))
    out = []
    for i, ann in enumerate(_list(read_json_file(annotations_path), "annotations", str(annotations_path))):
        at = f"{annotations_path}: annotations[{i}]"
        qid = _get(ann, "question_id", int, at)
        if qid not in texts:
            raise DataError(f"{at}: question_id {qid} is not in {questions_path}")
        answers = _list(ann, "answers", at)
        if not answers:
            raise DataError(f"{at}: no answers")
        words = tuple(_get(a, "answer", str, f"{at}.answers[{j}]") for j, a in enumerate(answers))
        kind = ann.get("answer_type", "")
        text, image = texts[qid]
        out.append(VqaQuestion(qid, words, kind if isinstance(kind, str) else "", text, image))
    if not out:
        raise DataError(f"{annotations_path}: no annotated question")
    return out


def read_vqa_results(path: str | Path, questions: list[VqaQuestion]) -> Found:
    """Predicted answers by question id, from VQA results JSON or an ask job's output (matched by image id,
    from the file name, and question text); see `Found`."""
    if _is_job_output(path):
        return _answers_from_job(path, questions)
    known = {q.question_id for q in questions}
    found = Found()
    for i, entry in enumerate(_list(read_json_file(path), "results", str(path))):
        at = f"{path}: [{i}]"
        qid = _get(entry, "question_id", int, at)
        answer = _get(entry, "answer", str, at)
        _add(found, qid, answer, qid in known, f"{at}: a second answer for question_id {qid}")
    return found


def _answers_from_job(path: str | Path, questions: list[VqaQuestion]) -> Found:
    wanted = {(q.image_id, q.question.strip()): q.question_id for q in questions}
    images = {q.image_id for q in questions}
    found = Found()
    for source, row, where in _job_rows(path, "ask"):
        digits = re.search(r"(\d+)\D*$", PurePosixPath(source.replace("\\", "/")).name)
        image = int(digits.group(1)) if digits else None
        if image not in images:
            found.ignored += 1
        elif row.get("error") is not None or row.get("answers") is None:
            found.failed += 1
        else:
            for j, pair in enumerate(_list(row, "answers", where)):
                at = f"{where}.answers[{j}]"
                qid = wanted.get((image, _get(pair, "question", str, at).strip()))
                answer = _get(pair, "answer", str, at)
                _add(found, qid, answer, qid is not None, f"{at}: a second answer for question_id {qid}")
    return found


# -- job outputs --------------------------------------------------------------------------------------------
def _is_job_output(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".parquet", ".jsonl")


def _job_rows(path: str | Path, task: str) -> Iterator[tuple[str, dict, str]]:
    """(source, row, where) of each row of a job's output: a .parquet folder of parts or a .jsonl file."""
    out = Path(path)
    reader: Callable[[Path], Iterator[tuple[dict, str]]]
    if out.suffix.lower() == ".parquet":
        manifest, reader = out / "_job.json", _parquet_rows
    else:
        manifest, reader = Path(f"{out}.job.json"), _jsonl_rows
    if manifest.exists():
        kind = read_json_file(manifest)
        if isinstance(kind, dict) and kind.get("task") not in (None, task):
            raise DataError(f"{out}: the output of a {kind.get('task')!r} job, not of {task!r}")
    for row, where in reader(out):
        yield _get(row, "source", str, where), row, where


def _jsonl_rows(file: Path) -> Iterator[tuple[dict, str]]:
    try:
        text = read_text(file, MAX_FILE_BYTES)
    except CheckpointError as e:
        raise DataError(str(e)) from None
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may be inside a row
        if line.strip():
            try:
                yield json.loads(line), f"{file}:{number}"
            except (ValueError, RecursionError):
                raise DataError(f"{file}:{number}: not a JSON line") from None


def _parquet_rows(folder: Path) -> Iterator[tuple[dict, str]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of parquet parts (a job's .parquet output)")
    parts = sorted(folder.glob("part-*.parquet"))
    for part in parts:
        if not part.is_file():  # a FIFO would block the reader
            raise DataError(f"{part}: not a regular file")
    if len(parts) > MAX_PARTS or sum(p.stat().st_size for p in parts) > MAX_FILE_BYTES:
        raise DataError(f"{folder}: more parts or bytes than a job's output we read")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{folder}: reading parquet needs pyarrow (pip install 'blip2[parquet]')") from None
    for part in parts:
        try:
            table = pq.read_table(part)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise DataError(f"{part}: not a readable parquet part ({str(e)[:120]})") from None
        for number, row in enumerate(table.to_pylist()):
            yield row, f"{part}, row {number}"
