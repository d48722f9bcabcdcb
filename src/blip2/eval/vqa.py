"""VQA accuracy as the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py) computes it.

An answer is normalised (tabs and newlines to spaces, stripped; punctuation; number words to digits;
articles dropped; contractions given their apostrophe), then compared with each of the (usually 10)
annotators' answers: for each annotator, min(#matches among the *other* annotators / 3, 1); the question's
accuracy is the mean over annotators (so 3 matching annotators give 0.9, 4 or more 1.0). The annotators'
answers get only the punctuation step, and only when they are not all the same (as the official code).

Quirks kept from the official code, to give its numbers: the period rule's look-behind is written as a
look-ahead, so every period not followed by a digit goes, and only the first 32 (`re.UNICODE` passed as the
`count` of `sub`); the contraction map gives curly apostrophes (`dont` -> `don’t`), and its capitalised keys
never match lower-cased text. Per answer type we average each question's accuracy, as LAVIS's copy of the
script does (GT-Vision-Lab's own averages, per type, only the last annotator's leave-one-out term).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# The official lists (vqaEval.py): data, not logic.
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCTUATION = [
    ";",
    ":",
    "/",
    "'",
    "[",
    "]",
    '"',
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module doc
_PERIOD_COUNT = int(re.UNICODE)  # sic: the official call passes re.UNICODE (32) as sub's count
_DIGIT_COMMA = re.compile(r"(\d)(\,)(\d)")
_A = "\u2019"  # the map's curly apostrophe
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": f"couldn{_A}t{_A}ve", f"couldnt{_A}ve": f"couldn{_A}t{_A}ve", "didnt": f"didn{_A}t",
    "doesnt": f"doesn{_A}t", "dont": f"don{_A}t", "hadnt": f"hadn{_A}t", f"hadnt{_A}ve": f"hadn{_A}t{_A}ve",
    "hadn'tve": f"hadn{_A}t{_A}ve", "hasnt": f"hasn{_A}t", "havent": f"haven{_A}t", "hed": f"he{_A}d",
    f"hed{_A}ve": f"he{_A}d{_A}ve", f"he{_A}dve": f"he{_A}d{_A}ve", "hes": f"he{_A}s", "howd": f"how{_A}d",
    "howll": f"how{_A}ll", "hows": f"how{_A}s", f"Id{_A}ve": f"I{_A}d{_A}ve", f"I{_A}dve": f"I{_A}d{_A}ve",
    "Im": f"I{_A}m", "Ive": f"I{_A}ve", "isnt": f"isn{_A}t", "itd": f"it{_A}d", f"itd{_A}ve": f"it{_A}d{_A}ve",
    f"it{_A}dve": f"it{_A}d{_A}ve", "itll": f"it{_A}ll", f"let{_A}s": f"let{_A}s", "maam": f"ma{_A}am",
    "mightnt": f"mightn{_A}t", f"mightnt{_A}ve": f"mightn{_A}t{_A}ve", f"mightn{_A}tve": f"mightn{_A}t{_A}ve",
    "mightve": f"might{_A}ve", "mustnt": f"mustn{_A}t", "mustve": f"must{_A}ve", "neednt": f"needn{_A}t",
    "notve": f"not{_A}ve", "oclock": f"o{_A}clock", "oughtnt": f"oughtn{_A}t",
    f"ow{_A}s{_A}at": f"{_A}ow{_A}s{_A}at", f"{_A}ows{_A}at": f"{_A}ow{_A}s{_A}at",
    f"{_A}ow{_A}sat": f"{_A}ow{_A}s{_A}at", "shant": f"shan{_A}t", f"shed{_A}ve": f"she{_A}d{_A}ve",
    f"she{_A}dve": f"she{_A}d{_A}ve", f"she{_A}s": f"she{_A}s", "shouldve": f"should{_A}ve",
    "shouldnt": f"shouldn{_A}t", f"shouldnt{_A}ve": f"shouldn{_A}t{_A}ve",
    f"shouldn{_A}tve": f"shouldn{_A}t{_A}ve", f"somebody{_A}d": "somebodyd",
    f"somebodyd{_A}ve": f"somebody{_A}d{_A}ve", f"somebody{_A}dve": f"somebody{_A}d{_A}ve",
    "somebodyll": f"somebody{_A}ll", "somebodys": f"somebody{_A}s", "someoned": f"someone{_A}d",
    f"someoned{_A}ve": f"someone{_A}d{_A}ve", f"someone{_A}dve": f"someone{_A}d{_A}ve",
    "someonell": f"someone{_A}ll", "someones": f"someone{_A}s", "somethingd": f"something{_A}d",
    f"somethingd{_A}ve": f"something{_A}d{_A}ve", f"something{_A}dve": f"something{_A}d{_A}ve",
    "somethingll": f"something{_A}ll", "thats": f"that{_A}s", "thered": f"there{_A}d",
    f"thered{_A}ve": f"there{_A}d{_A}ve", f"there{_A}dve": f"there{_A}d{_A}ve", "therere": f"there{_A}re",
    "theres": f"there{_A}s", "theyd": f"they{_A}d", f"theyd{_A}ve": f"they{_A}d{_A}ve",
    f"they{_A}dve": f"they{_A}d{_A}ve", "theyll": f"they{_A}ll", "theyre": f"they{_A}re",
    "theyve": f"they{_A}ve", "twas": f"{_A}twas", "wasnt": f"wasn{_A}t", f"wed{_A}ve": f"we{_A}d{_A}ve",
    f"we{_A}dve": f"we{_A}d{_A}ve", "weve": "we've", "werent": f"weren{_A}t", "whatll": f"what{_A}ll",
    "whatre": f"what{_A}re", "whats": f"what{_A}s", "whatve": f"what{_A}ve", "whens": f"when{_A}s",
    "whered": f"where{_A}d", "wheres": "where's", "whereve": f"where{_A}ve", "whod": f"who{_A}d",
    f"whod{_A}ve": f"who{_A}d{_A}ve", f"who{_A}dve": f"who{_A}d{_A}ve", "wholl": f"who{_A}ll",
    "whos": f"who{_A}s", "whove": "who've", "whyll": f"why{_A}ll", "whyre": f"why{_A}re", "whys": f"why{_A}s",
    "wont": f"won{_A}t", "wouldve": f"would{_A}ve", "wouldnt": f"wouldn{_A}t",
    f"wouldnt{_A}ve": f"wouldn{_A}t{_A}ve", f"wouldn{_A}tve": f"wouldn{_A}t{_A}ve", "yall": f"y{_A}all",
    f"yall{_A}ll": f"y{_A}all{_A}ll", f"y{_A}allll": f"y{_A}all{_A}ll", f"yall{_A}d{_A}ve": f"y{_A}all{_A}d{_A}ve",
    f"y{_A}alld{_A}ve": f"y{_A}all{_A}d{_A}ve", f"y{_A}all{_A}dve": f"y{_A}all{_A}d{_A}ve", "youd": f"you{_A}d",
    f"youd{_A}ve": f"you{_A}d{_A}ve", f"you{_A}dve": f"you{_A}d{_A}ve", "youll": f"you{_A}ll",
    "youre": f"you{_A}re", "youve": f"you{_A}ve",
}  # fmt: skip


def normalize_punctuation(text: str) -> str:
    """The official punctuation step: each mark removed where it touches a space (or anywhere, when the text
    has a digit-comma-digit), else replaced by a space; then periods not followed by a digit removed."""
    glued = bool(_DIGIT_COMMA.search(text))
    out = text
    for mark in _PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text  # tested on the text as given
        out = out.replace(mark, "" if spaced or glued else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it (see the module doc)."""
    text = normalize_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def accuracy(answer: str, annotations: Sequence[str]) -> float:
    """The accuracy of one predicted answer (raw) against the annotators' answers (raw), in [0, 1]."""
    if not annotations:
        raise ValueError("a question without annotated answers")
    predicted = normalize_answer(answer)
    truth = (
        list(annotations) if len(set(annotations)) == 1 else [normalize_punctuation(a) for a in annotations]
    )
    matches = sum(a == predicted for a in truth)
    # Leave each annotator out in turn: the others that match are `matches` minus that one if it matched.
    return sum(min(1.0, (matches - (a == predicted)) / 3) for a in truth) / len(truth)


@dataclass(frozen=True)
class Question:
    """One annotated question: its annotators' answers and its answer type (yes/no, number, other)."""

    question_id: int
    answers: tuple[str, ...]
    answer_type: str = ""
    question: str = ""


def evaluate(questions: Iterable[Question], predictions: Mapping[int, str]) -> dict:
    """Accuracy over the questions that have a prediction: {"overall", "per_answer_type": {type: acc},
    "questions": n, "per_question": {question_id: acc}}, accuracies in [0, 1]."""
    per_question: dict[int, float] = {}
    by_type: dict[str, list[float]] = {}
    for q in questions:
        if q.question_id in predictions:
            score = accuracy(predictions[q.question_id], q.answers)
            per_question[q.question_id] = score
            by_type.setdefault(q.answer_type, []).append(score)
    return {
        "overall": _mean(list(per_question.values())),
        "per_answer_type": {t: _mean(scores) for t, scores in sorted(by_type.items())},
        "questions": len(per_question),
        "per_question": per_question,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
