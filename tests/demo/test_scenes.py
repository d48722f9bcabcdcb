"""The scene generator, its texts and truth rules, make_data and the tokenizers: pure, no model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from blip2.demo import make_data, model, scenes, texts

TRAIN = [scenes.scene("train", i) for i in range(300)]


def test_scenes_are_a_pure_function_of_split_and_index():
    a, b = scenes.scene("train", 17), scenes.scene("train", 17)
    assert a == b
    assert np.array_equal(np.asarray(scenes.render(a)), np.asarray(scenes.render(b)))
    assert scenes.scene("heldout", 17) != a


def test_heldout_scenes_are_not_training_scenes():
    train = {(s.things, s.background) for s in TRAIN}
    heldout = [scenes.scene("heldout", i) for i in range(300)]
    repeated = sum((s.things, s.background) in train for s in heldout)
    # one-object scenes can coincide by chance (7 colours x 6 shapes x 2 sizes x 9 cells x 3 backgrounds)
    assert repeated <= 3


def test_scene_ground_truth_is_well_formed():
    for s in TRAIN:
        assert 1 <= len(s.things) <= scenes.MAX_OBJECTS
        assert len({t.cell for t in s.things}) == len(s.things)  # one object per cell
        groups = s.groups
        assert len({g.shape for g in groups}) == len(groups) == len({g.color for g in groups})
        assert sum(g.count for g in groups) == len(s.things)
        assert s.background not in scenes.COLORS
    assert {len(s.things) for s in TRAIN} == {1, 2, 3, 4}
    assert {t.shape for s in TRAIN for t in s.things} == set(scenes.SHAPES)
    assert {s.style for s in TRAIN} == set(scenes.STYLES)


def test_rendered_pixels_show_the_objects_on_the_background():
    """Each object's colour (within its jitter) is in its cell; an empty cell is the background's grey."""
    step = scenes.IMAGE_SIZE // scenes.GRID
    for s in TRAIN[:50]:
        pixels = np.asarray(scenes.render(s)).astype(float)
        assert pixels.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)
        filled = {t.cell: t for t in s.things}
        for row in range(scenes.GRID):
            for column in range(scenes.GRID):
                cell = pixels[row * step : (row + 1) * step, column * step : (column + 1) * step].reshape(
                    -1, 3
                )
                if (row, column) in filled:
                    target = np.array(scenes.COLORS[filled[(row, column)].color])
                    assert np.abs(cell - target).max(axis=1).min() < 25, (s, row, column)
                else:
                    grey = scenes.BACKGROUNDS[s.background]
                    assert np.abs(np.median(cell, axis=0) - grey).max() < 60, (s, row, column)


def test_captions_and_questions_follow_the_ground_truth():
    s = scenes.Scene(
        things=(
            scenes.Thing("circle", "red", "large", (0, 0)),
            scenes.Thing("star", "orange", "small", (0, 2)),
            scenes.Thing("circle", "red", "small", (2, 1)),
        ),
        background="gray",
        style="solid",
        seed=(0, 0),
    )
    assert texts.captions(s) == [
        "two red circles and an orange star on a gray background",
        "a picture of two red circles and an orange star on a gray background",
        "two red circles and an orange star",
    ]
    asked = {(q.question, q.answer) for q in texts.questions(s)}
    assert asked == {
        ("what color is the circle?", "red"),
        ("what shape is the red one?", "circle"),
        ("how many circles are there?", "two"),
        ("what color is the star?", "orange"),
        ("what shape is the orange one?", "star"),
        ("how many stars are there?", "one"),
        ("how many shapes are there?", "three"),
    }


def test_answers_agree_with_the_objects():
    """Each answer recomputed from the objects themselves, not from the groups."""
    for s in TRAIN:
        for q in texts.questions(s):
            words = q.question.rstrip("?").split()
            if q.kind == "color":
                assert {t.color for t in s.things if t.shape == words[-1]} == {q.answer}
            elif q.kind == "shape":
                assert {t.shape for t in s.things if t.color == words[-2]} == {q.answer}
            elif q.kind == "count":
                assert q.answer == scenes.NUMBERS[len(s.things)]
            else:
                shape = words[2][:-2] if words[2].endswith("sses") else words[2][:-1]
                assert q.answer == scenes.NUMBERS[sum(t.shape == shape for t in s.things)]


def test_truth_rules():
    rng = np.random.default_rng(0)
    for s in TRAIN:
        for caption in texts.captions(s):
            assert texts.names_objects(caption, s) and texts.caption_exact(caption, s)
        false = texts.false_caption(s, rng)
        assert not texts.caption_exact(false, s)
        assert texts.query_matches(texts.query(s, rng), s)
    s = TRAIN[0]
    assert not texts.query_matches("a purple hexagon", s)
    assert not texts.query_matches("", s)


def test_parse_groups():
    assert texts.parse_groups("Two red crosses, an orange star and a blue thing") == [
        scenes.Group("cross", "red", 2),
        scenes.Group("star", "orange", 1),
        scenes.Group("thing", "blue", 1),
    ]


def test_make_data_writes_images_and_rows(tmp_path):
    out = make_data.write(tmp_path / "data", "train", count=12, start=5, questions=3)
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    vqa = [json.loads(line) for line in (out / "vqa.jsonl").read_text().splitlines()]
    shapes = [json.loads(line) for line in (out / "shapes.jsonl").read_text().splitlines()]
    counts = [json.loads(line) for line in (out / "counts.jsonl").read_text().splitlines()]
    colors = [json.loads(line) for line in (out / "colors.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    truths = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(captions) == 12 and len(vqa) == 36 and len(truths) == 12
    assert captions[0]["image"] == "images/000005.png"
    for row, truth in zip(captions, truths):
        s = scenes.scene("train", truth["index"])
        assert (out / row["image"]).is_file() and row["caption"] in texts.captions(s)
        assert np.array_equal(
            np.asarray(scenes.render(s)), np.asarray(__import__("PIL.Image").Image.open(out / row["image"]))
        )
    for row in vqa:
        s = scenes.scene("train", int(row["image"][7:13]))
        assert (row["question"], row["answer"]) in {(q.question, q.answer) for q in texts.questions(s)}
    # the warm-up rows: one "what shape is the <colour> one?" per group of every scene, answered by its shape;
    # "how many <shape plural> are there?" per group and "how many shapes are there?" per scene; one "what
    # color is the <shape>?" per group
    written = [scenes.scene("train", i) for i in range(5, 17)]
    assert [(r["image"], r["question"], r["answer"]) for r in shapes] == [
        (f"images/{s.seed[1]:06d}.png", f"what shape is the {g.color} one?", g.shape)
        for s in written
        for g in s.groups
    ]
    for s in written:
        image = f"images/{s.seed[1]:06d}.png"
        asked = {(r["question"], r["answer"]) for r in counts if r["image"] == image}
        assert asked == {
            (f"how many {scenes.PLURALS[g.shape]} are there?", scenes.NUMBERS[g.count]) for g in s.groups
        } | {("how many shapes are there?", scenes.NUMBERS[len(s.things)])}
        assert {(r["question"], r["answer"]) for r in colors if r["image"] == image} == {
            (f"what color is the {g.shape}?", g.color) for g in s.groups
        }
        # for scenes with two or more groups, a search-like text naming two of them, then one naming one
        named = [texts.parse_groups(r["caption"]) for r in queries if r["image"] == image]
        assert [len(groups) for groups in named] == ([2, 1] if len(s.groups) > 1 else [])
        assert all(set(groups) <= set(s.groups) for groups in named)


def test_questions_are_balanced_by_kind():
    rng = np.random.default_rng(0)
    kinds = [q.kind for s in TRAIN for q in make_data.pick_questions(texts.questions(s), 2, rng)]
    shares = [kinds.count(kind) / len(kinds) for kind in texts.QUESTION_KINDS]
    assert min(shares) > 0.2


@pytest.fixture(scope="module")
def lines():
    return model.corpus(300)


def test_every_scene_word_is_one_token(lines):
    opt, qformer = model.opt_tokenizer(lines), model.qformer_tokenizer(lines)
    for line in lines:
        pieces = re.findall(r"\w+|[^\w\s]|\n", line)  # words, punctuation, the final newline
        assert len(opt.encode(line).ids) == 1 + len(pieces), line  # and the BOS
        assert qformer.encode(line).tokens == ["[CLS]", *(p.lower() for p in pieces[:-1]), "[SEP]"]
    assert opt.encode("a red star").tokens[0] == "</s>"
    assert opt.token_to_id("Ċ") is not None and qformer.token_to_id("[DEC]") is not None
