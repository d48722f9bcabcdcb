"""Training data: (image, caption) or (image, question, answer) rows from folders, JSONL or parquet files, and
the images preprocessed exactly as inference preprocesses them (the checkpoint's own image processor).

Every source is untrusted: a row that is not an object, lacks its fields, has text that is too long, or names
an image outside its file's folder is reported and skipped (counted), as is an image that does not decode;
nothing in the data stops a run. Sizes are capped (a JSONL line, a caption file, a text).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import InputError
from ..image_config import ImageProcessorConfig
from ..images import load_image, preprocess_one, resize, to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_LINE_BYTES = 1 << 20  # one JSONL row
MAX_CAPTION_FILE_BYTES = 1 << 20
MAX_TEXT_CHARS = (
    10_000  # one caption, question or answer; texts are truncated to max_text_length tokens anyway
)
MAX_ROWS = 100_000_000


@dataclass(frozen=True)
class Row:
    """One training pair: an image file and its caption, or (stage 2 VQA) a question and its answer."""

    image: Path
    caption: str | None = None
    question: str | None = None
    answer: str | None = None


@dataclass
class Rows:
    """The rows of every source, and what was skipped while reading them (reason per problem, a count)."""

    rows: list[Row] = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def skip(self, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < 1000:  # a report, not a copy of a broken file
            self.problems.append(problem)
        print(f"blip2 train: skipped: {problem}", file=sys.stderr)


def read_rows(sources: tuple[Path, ...] | list[Path], stage: int) -> Rows:
    """Every row of `sources` (folders, .jsonl, .parquet); an `InputError` for a source that is not there or
    of an unknown kind, or when no row at all is usable."""
    out = Rows()
    for source in sources:
        if source.is_dir():
            _folder_rows(source, out)
        elif source.suffix.lower() == ".jsonl":
            _jsonl_rows(source, stage, out)
        elif source.suffix.lower() == ".parquet":
            _parquet_rows(source, stage, out)
        elif source.exists():
            raise InputError(f"data: {source}: not a folder, .jsonl or .parquet file")
        else:
            raise InputError(f"data: {source}: no such file or folder")
    if not out.rows:
        raise InputError(f"data: no usable rows in {', '.join(map(str, sources))} ({out.skipped} skipped)")
    return out


def _folder_rows(folder: Path, out: Rows) -> None:
    """Images with a same-stem .txt file: one row per non-empty line of it."""
    for image in sorted(folder.iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            out.skip(f"{image}: no caption file {caption_file.name}")
            continue
        try:
            with open(caption_file, "rb") as f:
                data = f.read(MAX_CAPTION_FILE_BYTES + 1)
            if len(data) > MAX_CAPTION_FILE_BYTES:
                raise ValueError(f"larger than {MAX_CAPTION_FILE_BYTES} bytes")
            lines = [line.strip() for line in data.decode("utf-8").splitlines()]
        except (OSError, ValueError) as e:
            out.skip(f"{caption_file}: {e}")
            continue
        captions = [line for line in lines if line]
        if not captions:
            out.skip(f"{caption_file}: no caption")
        for caption in captions:
            _add(out, Row(image, caption=caption), folder, f"{caption_file}")


def _jsonl_rows(path: Path, stage: int, out: Rows) -> None:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"data: {path}: cannot read ({e.strerror or e})") from None
    with f:
        for number in range(1, MAX_ROWS + 1):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            where = f"{path}:{number}"
            if len(line) > MAX_LINE_BYTES:
                out.skip(f"{where}: longer than {MAX_LINE_BYTES} bytes")
                while line and not line.endswith(b"\n"):  # the rest of the long line
                    line = f.readline(MAX_LINE_BYTES)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                out.skip(f"{where}: not valid JSON ({e})")
                continue
            _record(record, path.parent, stage, where, out)


def _parquet_rows(path: Path, stage: int, out: Rows) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            f"data: {path}: reading parquet needs pyarrow (pip install 'blip2[parquet]')"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error classes (ArrowInvalid, OSError, ...)
        raise InputError(f"data: {path}: not a readable parquet file ({e})") from None
    names = [n for n in ("image", "caption", "question", "answer") if n in table.column_names]
    columns = {n: table.column(n).to_pylist() for n in names}
    for i in range(table.num_rows):
        _record({n: columns[n][i] for n in names}, path.parent, stage, f"{path}: row {i}", out)


def _record(record: object, base: Path, stage: int, where: str, out: Rows) -> None:
    """A row from a JSON object / parquet row: image + caption, or image + question + answer (stage 2)."""
    if not isinstance(record, dict):
        out.skip(f"{where}: not an object")
        return
    texts = {k: record.get(k) for k in ("caption", "question", "answer")}
    for key, value in texts.items():
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT_CHARS):
            out.skip(f"{where}: {key} must be a string of at most {MAX_TEXT_CHARS} characters")
            return
    image = record.get("image")
    if not isinstance(image, str) or not image:
        out.skip(f"{where}: no image path")
        return
    if texts["caption"]:
        row = Row(base / image, caption=texts["caption"].strip())
    elif texts["question"] and texts["answer"] and stage == 2:
        row = Row(base / image, question=texts["question"].strip(), answer=texts["answer"].strip())
    else:
        need = "caption, or question and answer" if stage == 2 else "caption"
        out.skip(f"{where}: needs a {need}")
        return
    _add(out, row, base, where)


def _add(out: Rows, row: Row, base: Path, where: str) -> None:
    """Add `row` unless its image lies outside `base` (an absolute path, '..', a symlink leading out)."""
    try:
        inside = Path(os.path.realpath(row.image)).is_relative_to(os.path.realpath(base))
    except (OSError, ValueError):
        inside = False
    if not inside:
        out.skip(f"{where}: image {str(row.image)!r} is outside {base}")
        return
    out.rows.append(row)


# -- images --------------------------------------------------------------------------------------------------------
def load_pixels(
    path: Path, config: ImageProcessorConfig, augment: str, generator: torch.Generator | None
) -> torch.Tensor:
    """(3, H, W) pixels of one image: the checkpoint's preprocessing, after LAVIS's training augmentation
    when `augment` is "lavis". Raises `Blip2Error` (ImageError) naming the image."""
    if augment == "none":
        return preprocess_one(path, config)
    image = random_resized_crop(load_image(path), generator)
    if bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(resize(image, config), config)


def random_resized_crop(
    image: Image.Image, generator: torch.Generator | None, scale: tuple[float, float] = (0.5, 1.0)
) -> Image.Image:
    """A crop of `scale` of the area and an aspect ratio in [3/4, 4/3] (log-uniform), as torchvision's
    RandomResizedCrop draws it (10 tries, then the whole image); the caller resizes it."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        draw = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + draw[0] * (scale[1] - scale[0]))
        ratio = math.exp(log_ratio[0] + draw[1] * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(draw[2] * (width - w + 1))
            top = int(draw[3] * (height - h + 1))
            return image.crop((left, top, left + w, top + h))
    return image


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The order rows are read in one epoch: a permutation drawn from (seed, epoch) alone, so a resumed run
    reads exactly what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


@dataclass
class Position:
    """Where the data stream is: the epoch and how many rows of its order were consumed."""

    epoch: int = 0
    offset: int = 0


def stream(rows: list[Row], seed: int, position: Position) -> Iterator[int]:
    """Row indices forever, epoch after epoch, from `position` (which it advances as it goes)."""
    while True:
        order = epoch_order(len(rows), seed, position.epoch)
        while position.offset < len(order):
            index = order[position.offset]
            position.offset += 1
            yield index
        position.epoch += 1
        position.offset = 0
