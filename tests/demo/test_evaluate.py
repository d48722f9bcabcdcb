"""The demo's score functions, on a stand-in model whose answers we choose."""

from __future__ import annotations

from blip2.demo import evaluate, texts


class FirstGroupOnly:
    """Answers the questions about a scene's first group right (texts.questions asks each group's three in
    turn), "no" to the rest; the pictures are the scenes' indices."""

    def __init__(self, scene_list):
        self.scene_list = scene_list

    def ask(self, picture, questions):
        first_group = {q.question: q.answer for q in texts.questions(self.scene_list[picture])[:3]}
        return [first_group.get(q, "no") for q in questions]


def test_ask_scores_count_every_question_of_every_scene():
    multi = next(s for s in evaluate.heldout(50) if len(s.groups) == 3)
    single = next(s for s in evaluate.heldout(50) if len(s.groups) == 1)
    scene_list = [multi, single]
    scores = evaluate.ask_scores(FirstGroupOnly(scene_list), scene_list, [0, 1])
    # per kind: the multi-group scene's first group right, its two others wrong; the single group right
    assert scores["color"] == scores["shape"] == scores["count_shape"] == 2 / 4
    assert scores["count"] == 0.0  # never the first group's question: answered "no"
    assert scores["questions"] == 3 * 3 + 1 + 3 + 1
    assert scores["all"] == 6 / 14


def test_ask_scores_normalise_answers_as_the_vqa_evaluation():
    s = next(s for s in evaluate.heldout(50) if len(s.groups) == 1)

    class Worded:
        def ask(self, picture, questions):
            right = {q.question: q.answer for q in texts.questions(s)}
            return [f"The {right[q].upper()}." for q in questions]

    assert evaluate.ask_scores(Worded(), [s], [None])["all"] == 1.0
