"""`python -m blip2.demo.evaluate [--scenes N]`: how right the demo model is on held-out scenes.

Held-out scenes (`scenes.scene("heldout", i)`) are drawn from another seed sequence than the training ones. The
numbers, each against the scene's ground truth:

- captions (`demo`, the task defaults: beam search, 5 beams): the rate of captions that name exactly the
  scene's (colour, shape) pairs, the rate that also get every count right, and CIDEr-D against all phrasings;
- ask (`demo`): accuracy per question kind (colour, shape, number of objects, number of one shape) and over
  all, on every question of each scene (each group's colour asked by its shape, shape asked by its colour,
  and number, and the number of objects). The answer is normalised as the VQA evaluation does (lowercase,
  articles and punctuation dropped, number words as digits); with one ground-truth answer (10 agreeing
  annotators) the VQA accuracy min(#agree / 3, 1) is 1 for a match and 0 otherwise, so this is VQA accuracy;
- match (`demo-itm`): ROC AUC of the ITM probability between each scene's true caption and a false one (one
  colour, shape or count changed);
- search (`demo-itm`): one query per scene (one or two of its groups), ranked over all the scenes by ITC
  similarity: the rate of queries whose first image is one the query is true of.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import scenes, texts

KINDS = texts.QUESTION_KINDS
_DIGITS = {word: str(n) for n, word in enumerate(scenes.NUMBERS)}


def heldout(count: int, start: int = 0) -> list[scenes.Scene]:
    return [scenes.scene("heldout", i) for i in range(start, start + count)]


def images(scene_list: Sequence[scenes.Scene]) -> list:
    return [scenes.render(s) for s in scene_list]


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation, as far as our answers need it."""
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    return " ".join(_DIGITS.get(w, w) for w in words if w not in ("a", "an", "the"))


def caption_scores(model, scene_list: Sequence[scenes.Scene], pictures: list) -> dict[str, Any]:
    said = model.caption(pictures)
    refs = {i: texts.captions(s) for i, s in enumerate(scene_list)}
    return {
        "names_objects": _rate(texts.names_objects(c, s) for c, s in zip(said, scene_list)),
        "exact": _rate(texts.caption_exact(c, s) for c, s in zip(said, scene_list)),
        "cider_d": cider_d(refs, dict(enumerate(said))),
        "examples": [{"caption": c, "truth": texts.captions(s)[0]} for c, s in zip(said[:5], scene_list)],
    }


def ask_scores(model, scene_list: Sequence[scenes.Scene], pictures: list) -> dict[str, Any]:
    """Accuracy per question kind and overall, over every question of every scene (texts.questions: each
    group's colour and shape and number, and the number of objects). Not a sample of them: the first group's
    questions alone (the top-left group's) overstated colours asked by shape by 0.15 in session 8."""
    right: dict[str, list[bool]] = {kind: [] for kind in KINDS}
    for s, picture in zip(scene_list, pictures):
        asked = texts.questions(s)
        answers = model.ask(picture, [q.question for q in asked])
        for q, answer in zip(asked, answers):
            right[q.kind].append(normalize_answer(answer) == normalize_answer(q.answer))
    scores: dict[str, Any] = {kind: _rate(hits) for kind, hits in right.items()}
    scores["all"] = _rate(hit for hits in right.values() for hit in hits)
    scores["questions"] = sum(len(hits) for hits in right.values())
    return scores


def match_scores(model, scene_list: Sequence[scenes.Scene], pictures: list) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    true = model.match(pictures, [texts.captions(s)[0] for s in scene_list])
    false = model.match(pictures, [texts.false_caption(s, rng) for s in scene_list])
    return {"auc": auc(true, false), "true_mean": float(np.mean(true)), "false_mean": float(np.mean(false))}


def search_scores(model, scene_list: Sequence[scenes.Scene], pictures: list) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    queries = [texts.query(s, rng) for s in scene_list]
    sims = model.similarity(pictures, queries)  # (n_images, n_queries)
    first = sims.argmax(dim=0).tolist()
    hits = [texts.query_matches(q, scene_list[i]) for q, i in zip(queries, first)]
    return {"top1": _rate(hits), "queries": len(queries)}


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC AUC: the probability that a positive scores above a negative (ties count half)."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def cider_d(refs: dict[int, list[str]], cands: dict[int, str]) -> float | None:
    """CIDEr-D of the candidates: blip2.eval's when installed, else pycocoevalcap's (the test extra), else
    None. The texts are lowercase words and commas: tokenized by dropping the commas."""
    tokenized_refs = {k: [_tokens(r) for r in v] for k, v in refs.items()}
    tokenized = {k: [_tokens(v)] for k, v in cands.items()}
    # Imported by name: blip2.eval is another branch's (merged later), pycocoevalcap has no type stubs.
    try:
        ours = importlib.import_module("blip2.eval.captions")
        return float(ours.cider_d(tokenized_refs, tokenized)[0])
    except ImportError:
        pass
    try:
        cider = importlib.import_module("pycocoevalcap.cider.cider")
    except ImportError:
        return None
    return float(cider.Cider().compute_score(tokenized_refs, tokenized)[0])


def _tokens(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _rate(hits) -> float:
    hits = list(hits)
    return sum(hits) / len(hits) if hits else 0.0


def evaluate(caption_model, retrieval_model, count: int = 300) -> dict[str, Any]:
    """Every number of the module docstring on `count` held-out scenes."""
    scene_list = heldout(count)
    pictures = images(scene_list)
    return {
        "scenes": count,
        "caption": caption_scores(caption_model, scene_list, pictures),
        "ask": ask_scores(caption_model, scene_list, pictures),
        "match": match_scores(retrieval_model, scene_list, pictures),
        "search": search_scores(retrieval_model, scene_list, pictures),
    }


def main(argv: list[str] | None = None) -> None:
    import blip2

    parser = argparse.ArgumentParser(
        prog="python -m blip2.demo.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenes", type=int, default=300, help="held-out scenes (default 300)")
    parser.add_argument("--model", default="demo", help="the captioning checkpoint (default: demo)")
    parser.add_argument(
        "--retrieval", default="demo-itm", help="the retrieval checkpoint (default: demo-itm)"
    )
    args = parser.parse_args(argv)
    result = evaluate(blip2.load(args.model, "cpu"), blip2.load(args.retrieval, "cpu"), args.scenes)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
