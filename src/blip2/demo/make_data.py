"""`python -m blip2.demo.make_data OUT --count N [--split train|heldout] [--questions K]`: write N scenes as an
image folder and the JSONL files the training code reads.

OUT/images/NNNNNN.png (48x48 RGB, scenes.IMAGE_SIZE) and, one row per line, paths relative to OUT:
- captions.jsonl: {"image", "caption"}, one row per image, its phrasing drawn per image (stage 1, and stage 2's
  captioning);
- vqa.jsonl: {"image", "question", "answer"}, K questions per image, their kinds (colour, shape, count, count
  of a shape) drawn evenly, so that no kind is rare (stage 2);
- shapes.jsonl: {"image", "question", "answer"}, every "what shape is the <colour> one?" of each image: the
  warm-up that teaches the vision tower shapes (warmup.yaml);
- counts.jsonl: the same with every count question of each image (how many shapes, how many of a shape):
  with shapes.jsonl, the run that teaches it to count (counting.yaml);
- colors.jsonl: the same with every "what color is the <shape>?": with the two above, the run that teaches it
  to bind a colour to its shape (binding.yaml);
- queries.jsonl: {"image", "caption"}, for each image with two or more groups two search-like texts, one
  naming two of its groups ("two red circles and a blue star") and one naming one ("a blue star"), drawn per
  image: stage 1's extra texts, so that ITC learns partial descriptions (with captions and two-group texts
  alone, a one-group search for a group of a busier scene scored that scene no higher than any other);
- scenes.jsonl: the ground truth of each image (its objects, background, style), for evaluation scripts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import scenes, texts

# The files of every question of some kinds (the vision tower's warm-up runs), and their kinds.
EVERY_QUESTION = {
    "shapes.jsonl": ("shape",),
    "counts.jsonl": ("count", "count_shape"),
    "colors.jsonl": ("color",),
}
# Every file write() makes besides the images, one JSON row per line.
FILES = ("captions.jsonl", "vqa.jsonl", *EVERY_QUESTION, "queries.jsonl", "scenes.jsonl")


def rows(split: str, start: int, count: int, questions: int) -> Iterator[tuple[int, dict[str, list[dict]]]]:
    """For each scene: (index, {file of FILES: the scene's rows in it}); image paths are images/NNNNNN.png.
    The text choices are drawn from the scene's own seed: a pure function of (split, i)."""
    for i in range(start, start + count):
        s = scenes.scene(split, i)
        rng = np.random.default_rng([*s.seed, 2])
        image = f"images/{i:06d}.png"
        phrasings = texts.captions(s)
        caption = {"image": image, "caption": phrasings[int(rng.integers(len(phrasings)))]}
        every = texts.questions(s)
        qa = [_qa_row(image, q) for q in pick_questions(every, questions, rng)]
        warmup = {
            name: [_qa_row(image, q) for q in every if q.kind in kinds]
            for name, kinds in EVERY_QUESTION.items()
        }
        queries = [
            {"image": image, "caption": texts.query(s, np.random.default_rng([*s.seed, salt]), n)}
            for n, salt in ((2, 3), (1, 4))
            if len(s.groups) > 1
        ]
        truth = {"image": image, "index": i, "split": split, **asdict(s)}
        yield (
            i,
            {
                "captions.jsonl": [caption],
                "vqa.jsonl": qa,
                **warmup,
                "queries.jsonl": queries,
                "scenes.jsonl": [truth],
            },
        )


def _qa_row(image: str, q: texts.Question) -> dict:
    return {"image": image, "question": q.question, "answer": q.answer}


def pick_questions(
    candidates: list[texts.Question], k: int, rng: np.random.Generator
) -> list[texts.Question]:
    """k questions of distinct kinds where possible (kinds in random order, then one question of each)."""
    by_kind: dict[str, list[texts.Question]] = {}
    for q in candidates:
        by_kind.setdefault(q.kind, []).append(q)
    kinds = [list(by_kind)[j] for j in rng.permutation(len(by_kind))]
    picked = []
    for j in range(k):
        pool = by_kind[kinds[j % len(kinds)]]
        picked.append(pool[int(rng.integers(len(pool)))])
    return picked


def write(
    out: Path,
    split: str = "train",
    count: int = 1000,
    start: int = 0,
    questions: int = 2,
    images: bool = True,
) -> Path:
    """Write the scenes [start, start + count) of `split` to `out` (see the module docstring); return `out`.
    With `images=False`, only the JSONL files (the images already there are those scenes': they are a pure
    function of the index)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        files = {name: stack.enter_context(open(out / name, "w")) for name in FILES}
        for i, by_file in rows(split, start, count, questions):
            if images:
                scenes.render(scenes.scene(split, i)).save(out / "images" / f"{i:06d}.png")
            for name, lines in by_file.items():
                files[name].writelines(json.dumps(row) + "\n" for row in lines)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m blip2.demo.make_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out", type=Path, help="the folder to write (created)")
    parser.add_argument("--count", type=int, default=1000, help="how many scenes (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="the index of the first scene (default 0)")
    parser.add_argument("--split", choices=sorted(scenes.SPLITS), default="train")
    parser.add_argument("--questions", type=int, default=2, help="questions per image (default 2)")
    args = parser.parse_args(argv)
    write(args.out, args.split, args.count, args.start, args.questions)
    print(f"wrote {args.count} {args.split} scenes to {args.out}")


if __name__ == "__main__":
    main()
