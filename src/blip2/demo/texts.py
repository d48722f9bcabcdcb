"""The texts of a scene, from its ground truth alone: captions, question-answer pairs, false captions (one
attribute changed) and search queries, with the rules that say whether a text is true of a scene."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from .scenes import COLORS, NUMBERS, PLURALS, SHAPES, Group, Scene

# Caption phrasings; every one is a reference for CIDEr. The model learns them all and says one.
TEMPLATES = (
    "{objects} on a {background} background",
    "a picture of {objects} on a {background} background",
    "{objects}",
)
QUESTION_KINDS = ("color", "shape", "count", "count_shape")


def group_phrase(group: Group) -> str:
    """ "a red circle", "two blue stars"."""
    if group.count == 1:
        return f"{article(group.color)} {group.color} {group.shape}"
    return f"{NUMBERS[group.count]} {group.color} {PLURALS[group.shape]}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def objects_phrase(groups: tuple[Group, ...] | list[Group]) -> str:
    """ "a red circle", "a red circle and two blue stars", "a, b and c"."""
    phrases = [group_phrase(g) for g in groups]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(s: Scene) -> list[str]:
    """Every phrasing of the scene's caption (TEMPLATES order)."""
    objects = objects_phrase(s.groups)
    return [t.format(objects=objects, background=s.background) for t in TEMPLATES]


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str


def questions(s: Scene) -> list[Question]:
    """Every question with one right answer: each group's colour (asked by its shape) and shape (asked by its
    colour), the number of objects, and the number of each shape present."""
    out = []
    for g in s.groups:
        out.append(Question("color", f"what color is the {g.shape}?", g.color))
        out.append(Question("shape", f"what shape is the {g.color} one?", g.shape))
        out.append(Question("count_shape", f"how many {PLURALS[g.shape]} are there?", NUMBERS[g.count]))
    out.append(Question("count", "how many shapes are there?", NUMBERS[len(s.things)]))
    return out


def false_caption(s: Scene, rng: np.random.Generator) -> str:
    """The first phrasing of the caption with one attribute of one group changed: its colour or shape (to one
    no group has) or its count (to another from 1 to 4)."""
    groups = list(s.groups)
    k = int(rng.integers(len(groups)))
    g = groups[k]
    attribute = ("color", "shape", "count")[int(rng.integers(3))]
    if attribute == "color":
        free = [c for c in COLORS if c not in {h.color for h in groups}]
        groups[k] = replace(g, color=free[int(rng.integers(len(free)))])
    elif attribute == "shape":
        free = [x for x in SHAPES if x not in {h.shape for h in groups}]
        groups[k] = replace(g, shape=free[int(rng.integers(len(free)))])
    else:
        others = [n for n in range(1, 5) if n != g.count]
        groups[k] = replace(g, count=others[int(rng.integers(len(others)))])
    return TEMPLATES[0].format(objects=objects_phrase(groups), background=s.background)


def query(s: Scene, rng: np.random.Generator, n: int | None = None) -> str:
    """A search query true of the scene: `n` of its groups ("two red circles and a blue star"), by default
    one or two (drawn); `n` is at most the number of groups."""
    groups = s.groups
    if n is None:
        n = 1 if len(groups) == 1 else int(rng.integers(1, 3))
    n = min(n, len(groups))
    picked = sorted(rng.choice(len(groups), n, replace=False).tolist())
    return objects_phrase([groups[i] for i in picked])


# -- truth rules ----------------------------------------------------------------------------------------------
_GROUP = re.compile(
    r"\b(a|an|one|two|three|four)\s+(" + "|".join(COLORS) + r")\s+(\w+)",
)


def parse_groups(text: str) -> list[Group]:
    """The "<count> <colour> <shape>" phrases of a text, in order; a shape word that is not a known shape or
    plural is kept as said (so it matches nothing)."""
    singular = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
    out = []
    for count, color, shape in _GROUP.findall(text.lower()):
        n = 1 if count in ("a", "an") else NUMBERS.index(count)
        out.append(Group(singular.get(shape, shape), color, n))
    return out


def query_matches(text: str, s: Scene) -> bool:
    """Whether every group a query names is in the scene with that count (and it names at least one)."""
    wanted = parse_groups(text)
    return bool(wanted) and all(g in s.groups for g in wanted)


def names_objects(caption: str, s: Scene) -> bool:
    """The caption rule: it names exactly the scene's (colour, shape) pairs, whatever it says of counts."""
    said = {(g.color, g.shape) for g in parse_groups(caption)}
    return said == {(g.color, g.shape) for g in s.groups}


def caption_exact(caption: str, s: Scene) -> bool:
    """Stricter: exactly the scene's groups, counts included."""
    return sorted(parse_groups(caption), key=repr) == sorted(s.groups, key=repr)
