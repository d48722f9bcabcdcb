"""Each processor against the transformers LogitsProcessor of the same purpose, on random scores and ids."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as hf

from blip2.generation import GenerationOptions
from blip2.generation import processors as ours

N, V = 6, 50


def _scores(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g) * 3


def _ids(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    # A small id range makes repeats (and repeated n-grams) common.
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(0, vocab, (N, length), generator=g)


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty(penalty):
    scores, ids = _scores(), _ids(9, V)
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
    assert torch.equal(ours.repetition_penalty(scores, ids, penalty), expected)


def test_repetition_penalty_skips_left_padding():
    scores, ids = _scores(1), _ids(9, V, seed=1)
    skip = torch.tensor([0, 3, 1, 8, 9, 2])
    expected = hf.RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=skip)(ids, scores.clone())
    assert torch.equal(ours.repetition_penalty(scores, ids, 1.3, skip), expected)
    assert not torch.equal(expected, hf.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))


def test_repetition_penalty_ignores_ids_past_vocab():
    scores, ids = _scores(2), _ids(9, V + 20, seed=2)
    expected = hf.RepetitionPenaltyLogitsProcessor(2.0)(ids, scores.clone())
    assert torch.equal(ours.repetition_penalty(scores, ids, 2.0), expected)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 3, 12, 30])
def test_no_repeat_ngram(size, length):
    scores, ids = _scores(size), _ids(length, 4, seed=length)
    expected = hf.NoRepeatNGramLogitsProcessor(size)(ids, scores.clone())
    got = ours.no_repeat_ngram(scores, ids, size)
    assert torch.equal(got, expected)
    if length == 30:
        assert torch.isinf(got).any()  # the case bans something


@pytest.mark.parametrize("eos", [[3], [3, 7, 11]])
@pytest.mark.parametrize("length", [4, 6, 9, 10])
def test_forbid_eos_matches_min_new_tokens(eos, length):
    prompt, min_new = 4, 5
    scores, ids = _scores(length), _ids(length, V)
    expected = hf.MinNewTokensLengthLogitsProcessor(prompt, min_new, eos)(ids, scores.clone())
    assert torch.equal(ours.forbid_eos(scores, length - prompt, min_new, torch.tensor(eos)), expected)


@pytest.mark.parametrize("value", [0.3, 1.7])
def test_temperature(value):
    scores = _scores()
    assert torch.equal(
        ours.temperature(scores, value), hf.TemperatureLogitsWarper(value)(None, scores.clone())
    )


@pytest.mark.parametrize("k", [1, 5, V, V + 10])
def test_top_k(k):
    scores = _scores()
    scores[0, :10] = 1.0  # ties at the cut are kept
    assert torch.equal(ours.top_k(scores, k), hf.TopKLogitsWarper(k)(None, scores.clone()))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 1.0])
def test_top_p(p):
    scores = _scores(3)
    assert torch.equal(ours.top_p(scores, p), hf.TopPLogitsWarper(p)(None, scores.clone()))


SETTINGS = [
    dict(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=6),
    dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2, min_new_tokens=2),
    dict(do_sample=True, top_k=0, top_p=0.5, no_repeat_ngram_size=1),
    dict(do_sample=True),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_process_matches_transformers_order(opt_case, settings):
    """`process` against the processor list transformers builds for the same options."""
    prompt, eos = 5, [3, 8]
    config = GenerationConfig(**settings, eos_token_id=eos, max_new_tokens=20)
    config._eos_token_tensor = torch.tensor(eos)
    chain = opt_case.model._get_logits_processor(config, input_ids_seq_length=prompt, device="cpu")
    options = GenerationOptions(**settings)
    for length in [5, 6, 8, 12]:
        scores, ids = _scores(length), _ids(length, 10, seed=length)
        got = ours.process(scores, ids, options, prompt, torch.tensor(eos))
        assert torch.equal(got, chain(ids, scores.clone()))
