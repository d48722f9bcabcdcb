"""BLEU, ROUGE-L and CIDEr-D against pycocoevalcap's own scorers on the same tokenized captions."""

from __future__ import annotations

import pytest
from eval_fixtures import caption_fixture

from blip2.errors import InputError
from blip2.eval.captions import bleu, cider_d, rouge_l
from blip2.eval.tokenize import tokenize

pytest.importorskip("pycocoevalcap", reason="the oracle: pip install pycocoevalcap (the test extra)")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402


def tokenized(seed: int):
    refs, cands = caption_fixture(seed)
    return (
        {k: [tokenize(c) for c in v] for k, v in refs.items()},
        {k: [tokenize(c) for c in v] for k, v in cands.items()},
    )


def close(a, b):
    assert a == pytest.approx(b, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_equals_pycocoevalcap(seed):
    refs, cands = tokenized(seed)
    ours, ours_each = bleu(refs, cands)
    theirs, theirs_each = Bleu(4).compute_score(refs, cands, verbose=0)
    close(ours, theirs)
    for k in range(4):
        close(ours_each[k], theirs_each[k])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ours_fn, oracle", [(rouge_l, Rouge), (cider_d, Cider)], ids=["rouge_l", "cider_d"])
def test_rouge_l_and_cider_d_equal_pycocoevalcap(seed, ours_fn, oracle):
    refs, cands = tokenized(seed)
    ours, ours_each = ours_fn(refs, cands)
    theirs, theirs_each = oracle().compute_score(refs, cands)
    close(ours, float(theirs))
    close(ours_each, list(theirs_each))


def test_edge_cases_score_as_expected():
    refs, cands = tokenized(0)
    assert bleu(refs, cands)[1][3][0] < 1e-6  # the empty candidate
    assert rouge_l(refs, cands)[1][1] == 1.0  # a candidate equal to a reference
    assert cider_d({1: ["a b"], 2: ["c d"]}, {1: ["a b"], 2: ["x"]})[1][1] == 0.0


def test_cider_of_one_image_and_one_candidate_each():
    refs, cands = {"x": ["a dog runs"]}, {"x": ["a dog runs"]}
    close(cider_d(refs, cands)[0], float(Cider().compute_score(refs, cands)[0]))


@pytest.mark.parametrize(
    "refs, cands, words",
    [
        ({1: ["a"]}, {2: ["a"]}, "different images"),
        ({1: ["a"]}, {1: ["a", "b"]}, "2 candidates"),
        ({1: []}, {1: ["a"]}, "no reference"),
        ({}, {}, "no images"),
    ],
)
def test_mismatched_inputs_are_input_errors(refs, cands, words):
    with pytest.raises(InputError, match=words):
        bleu(refs, cands)
