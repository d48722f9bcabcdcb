"""Deferred stop checks (`generate(..., check_every=k)`): the loops read the device's stop flag every k
steps instead of every step, and return exactly transformers' tokens all the same."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

# The option sets of the parity tests, and the prompts whose searches end within a few tokens.
from test_generation_parity import CASES, EARLY_ROWS

from blip2.errors import InputError
from blip2.generation import GenerationOptions, decoding, generate

HF_FIELDS = ["max_new_tokens", "min_new_tokens", "num_beams", "repetition_penalty", "no_repeat_ngram_size"]
HF_FIELDS += ["length_penalty", "early_stopping", "num_return_sequences"]


def _options(name: str) -> GenerationOptions:
    return GenerationOptions(**({"max_new_tokens": 20} | CASES[name]))


@functools.cache
def _reference(case, name: str) -> tuple[torch.Tensor, int]:
    """transformers' tokens (the oracle) for option set `name` on the prompts that end early, and the model
    calls of our loop with the exact check (the parity tests pin them to transformers')."""
    subset = case.subset(EARLY_ROWS[case.name])
    options = _options(name)
    expected = subset.reference(**{field: getattr(options, field) for field in HF_FIELDS})
    return expected, _ours(subset, options, 1)[1].steps


def _ours(case, options: GenerationOptions, check_every: int):
    stepper = case.stepper()
    mask = case.mask if case.name == "opt" else None
    out = generate(stepper, case.history, options, case.eos, case.pad, mask, check_every=check_every)
    return out, stepper


@pytest.mark.parametrize("check_every", [2, 5])
@pytest.mark.parametrize("name", list(CASES))
def test_deferred_checks_give_transformers_tokens(case, name, check_every):
    ours, stepper = _ours(case.subset(EARLY_ROWS[case.name]), _options(name), check_every)
    expected, exact_steps = _reference(case, name)
    assert ours.shape == expected.shape and torch.equal(ours, expected), (ours, expected)
    # At most check_every - 1 model calls past where the exact check stops.
    assert exact_steps <= stepper.steps <= exact_steps + check_every - 1


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_the_flag_is_read_every_k_steps(case, kwargs, monkeypatch):
    """Count the loops' host reads of the stop flag: one per k steps (none on the last step)."""
    reads: list = []
    read_flag = decoding._read_flag
    monkeypatch.setattr(decoding, "_read_flag", lambda flag: reads.append(1) or read_flag(flag))
    # min_new_tokens = max_new_tokens: nothing ends early, so all 12 tokens are generated either way.
    options = GenerationOptions(max_new_tokens=12, min_new_tokens=12, **kwargs)
    counts = {}
    for check_every in (1, 4):
        reads.clear()
        out, stepper = _ours(case, options, check_every)
        assert out.shape[1] == 12 and stepper.steps == 11
        counts[check_every] = len(reads)
    assert counts == {1: 11, 4: 2}  # steps 4 and 8 (1-based); step 12 ends the loop unread


def test_unseeded_sampling_checks_every_step(opt_case):
    """Steps past the end would draw from the global RNG: unseeded sampling reads the flag every step, so
    the RNG is left as the exact check leaves it."""
    options = GenerationOptions(max_new_tokens=20, do_sample=True)
    states = []
    for check_every in (1, 6):
        torch.manual_seed(0)
        out, stepper = _ours(opt_case.subset(EARLY_ROWS["opt"]), options, check_every)
        states.append((out, stepper.steps, torch.get_rng_state()))
    assert torch.equal(states[0][0], states[1][0]) and states[0][1] == states[1][1]
    assert torch.equal(states[0][2], states[1][2])


@pytest.mark.parametrize("check_every", [0, -1, 2.0, True])
def test_check_every_is_a_positive_integer(opt_case, check_every):
    with pytest.raises(InputError, match="check_every"):
        _ours(opt_case, GenerationOptions(), check_every)


@pytest.mark.parametrize("name", ["greedy", "beam3-lp-1", "beam3-ngram"])
def test_deferred_checks_do_step_past_the_end(case, name):
    """The cases above are not vacuous: here the deferred loop makes model calls past where the search
    ended, whose tokens must not show."""
    _, stepper = _ours(case.subset(EARLY_ROWS[case.name]), _options(name), 5)
    assert stepper.steps > _reference(case, name)[1]


def test_a_stopped_beam_search_keeps_its_finished_hypotheses():
    """Once the stop rule has held, `_keep_finished` leaves the finished set as it is, even when better
    candidates end; before, it takes them (the check is not vacuous)."""
    options = GenerationOptions(num_beams=2, max_new_tokens=4)
    history = torch.tensor([[5, 6]])
    beams = decoding._init_beams(history, num_beams=2, max_length=6, fill=0)
    beams.done_scores = torch.tensor([[-3.0, -4.0]])
    beams.is_done = torch.tensor([[True, True]])
    candidates = torch.tensor(
        [[[5, 6, 9, 0, 0, 0], [5, 6, 8, 0, 0, 0], [5, 6, 7, 0, 0, 0], [5, 6, 4, 0, 0, 0]]]
    )
    scores = torch.tensor([[-0.5, -1.0, -2.0, -2.5]])
    ended = torch.tensor([[True, True, False, False]])
    before = (beams.done.clone(), beams.done_scores.clone(), beams.done_lengths.clone())
    for stopped, changed in ((True, False), (False, True)):
        state = dataclasses.replace(beams)
        decoding._keep_finished(state, scores, candidates, ended, 1, options, torch.tensor(stopped))
        after = (state.done, state.done_scores, state.done_lengths)
        assert changed != all(torch.equal(a, b) for a, b in zip(after, before))
