"""VQA accuracy against a direct implementation of the official rules written here, character by character,
and against values the rules give by hand."""

from __future__ import annotations

import random

import pytest

from blip2.eval.vqa import Question, accuracy, evaluate, normalize_answer, normalize_punctuation

MARKS = ";:/'[]\"()=+\\_><@`,?"


def direct_punctuation(text: str) -> str:
    has_digit_comma = any(
        text[i].isdigit() and text[i + 1] == "," and text[i + 2].isdigit() for i in range(len(text) - 2)
    )
    out = text
    for mark in MARKS:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if touches_space or has_digit_comma else " ")
    chars, removed = [], 0
    for i, ch in enumerate(out):
        followed_by_digit = i + 1 < len(out) and out[i + 1].isdigit()
        if ch == "." and not followed_by_digit and removed < 32:
            removed += 1
            continue
        chars.append(ch)
    return "".join(chars)


NUMBER_WORDS = ["none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# A few entries of the official contraction map, as it writes them (curly apostrophes but for weve/wheres).
CONTRACTIONS = {
    "dont": "don\u2019t",
    "isnt": "isn\u2019t",
    "whats": "what\u2019s",
    "yall": "y\u2019all",
    "weve": "we've",
}
NUMBER_DIGITS = ["0", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]


def direct_answer(answer: str) -> str:
    text = direct_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        if word in NUMBER_WORDS:
            word = NUMBER_DIGITS[NUMBER_WORDS.index(word)]
        if word not in ("a", "an", "the"):
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def direct_accuracy(answer: str, annotations: list[str]) -> float:
    predicted = direct_answer(answer)
    truth = annotations if len(set(annotations)) == 1 else [direct_punctuation(a) for a in annotations]
    terms = []
    for left_out in range(len(truth)):
        others = truth[:left_out] + truth[left_out + 1 :]
        terms.append(min(1.0, len([a for a in others if a == predicted]) / 3))
    return sum(terms) / len(terms)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A red, white and blue flag", "red white and blue flag"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes!", "yes!"),  # '!' is not in the official list
        ("dont", "don\u2019t"),  # the official map's curly apostrophe
        ("t-shirt", "t-shirt"),
        ("  left\tside\n", "left side"),
        ("hot dog(s)", "hot dog s"),
        ("hot dog (s)", "hot dog s"),
        ("none", "0"),
    ],
)
def test_normalize_answer_known_cases(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    "matching, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_ten_annotator_rule(matching, expected):
    # min(#others matching / 3, 1) averaged over the 10 annotators left out in turn.
    annotations = ["2"] * matching + ["3"] * (10 - matching)
    assert accuracy("two", annotations) == pytest.approx(expected)


def test_accuracy_equals_a_direct_implementation_on_random_cases():
    rng = random.Random(0)
    pool = [
        "yes",
        "no",
        "2",
        "two",
        "the dog",
        "dog",
        "dog.",
        "red, white",
        "red white",
        "1,000",
        "a cat?",
        "dont",
        "weve",
    ]
    for _ in range(500):
        annotations = [rng.choice(pool) for _ in range(10)]
        answer = rng.choice(pool + ["Yes", "Two.", "  dog\n", "An apple"])
        assert accuracy(answer, annotations) == pytest.approx(direct_accuracy(answer, annotations), abs=1e-15)


def test_punctuation_equals_a_direct_implementation():
    rng = random.Random(1)
    alphabet = "ab 1,2.3" + MARKS
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert normalize_punctuation(text) == direct_punctuation(text), repr(text)
    many_periods = "a." * 40
    assert normalize_punctuation(many_periods).count(".") == 8  # only 32 go (the official count quirk)


def test_annotations_are_only_punctuation_normalised():
    # The annotators' "two" is not turned into "2": the official script leaves annotations' words alone.
    assert accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0
    assert accuracy("dog", ["dog."] * 5 + ["cat"] * 5) == 1.0
    assert accuracy("dog", ["dog."] * 10) == 0.0  # all the same: not normalised at all


def test_evaluate_per_answer_type():
    questions = [
        Question(1, ("yes",) * 10, "yes/no"),
        Question(2, ("2",) * 3 + ("3",) * 7, "number"),
        Question(3, ("red",) * 10, "other"),
        Question(4, ("blue",) * 10, "other"),  # no prediction: not counted
    ]
    result = evaluate(questions, {1: "Yes", 2: "two", 3: "green"})
    assert result["questions"] == 3
    assert result["per_answer_type"] == {"number": pytest.approx(0.9), "other": 0.0, "yes/no": 1.0}
    assert result["overall"] == pytest.approx(1.9 / 3)
    assert result["per_question"] == {1: 1.0, 2: pytest.approx(0.9), 3: 0.0}
