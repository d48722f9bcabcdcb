"""Our decoding loops against transformers' `generate` on tiny models: the tokens must be identical,
padding included."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blip2.generation import GenerationOptions, generate

# Options that are also transformers' generate keyword arguments.
_HF_FIELDS = [
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "do_sample",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
]

CASES = {
    "greedy": dict(),
    "greedy-one-token": dict(max_new_tokens=1),
    "greedy-repetition": dict(repetition_penalty=1.5),
    "greedy-ngram": dict(no_repeat_ngram_size=2),
    "greedy-ngram-1": dict(no_repeat_ngram_size=1, max_new_tokens=12),
    "greedy-min-new": dict(min_new_tokens=5),
    "greedy-all": dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=4),
    "beam3": dict(num_beams=3),
    "beam3-lp0": dict(num_beams=3, length_penalty=0.0),
    "beam3-lp-1": dict(num_beams=3, length_penalty=-1.0),
    "beam3-lp2": dict(num_beams=3, length_penalty=2.0),
    "beam5": dict(num_beams=5),
    "beam5-lp0": dict(num_beams=5, length_penalty=0.0),
    "beam5-lp-1": dict(num_beams=5, length_penalty=-1.0),
    "beam5-lp2": dict(num_beams=5, length_penalty=2.0),
    "beam3-early": dict(num_beams=3, early_stopping=True),
    "beam5-early-lp2": dict(num_beams=5, early_stopping=True, length_penalty=2.0),
    "beam3-never": dict(num_beams=3, early_stopping="never"),
    "beam5-never-lp2": dict(num_beams=5, early_stopping="never", length_penalty=2.0),
    "beam5-never-lp-1": dict(num_beams=5, early_stopping="never", length_penalty=-1.0),
    "beam4-return2": dict(num_beams=4, num_return_sequences=2),
    "beam4-return4-lp0": dict(num_beams=4, num_return_sequences=4, length_penalty=0.0),
    "beam3-short": dict(num_beams=3, max_new_tokens=4),
    "beam3-one-token": dict(num_beams=3, max_new_tokens=1),
    "beam3-repetition": dict(num_beams=3, repetition_penalty=1.5),
    "beam3-ngram": dict(num_beams=3, no_repeat_ngram_size=2),
    "beam3-min-new": dict(num_beams=3, min_new_tokens=5),
    "beam4-all": dict(
        num_beams=4,
        num_return_sequences=3,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        min_new_tokens=3,
        length_penalty=0.5,
        early_stopping=True,
    ),
}


def _hf_kwargs(options: GenerationOptions) -> dict:
    return {name: getattr(options, name) for name in _HF_FIELDS}


def _ours(case, options: GenerationOptions, eos=None):
    stepper = case.stepper()
    eos = case.eos if eos is None else eos
    out = generate(stepper, case.history, options, eos, case.pad, attention_mask=_decoder_mask(case))
    return out, stepper


def _decoder_mask(case):
    # transformers' repetition penalty skips the prompt's left padding (decoder-only models only).
    return case.mask if case.name == "opt" else None


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(case, name):
    options = GenerationOptions(**({"max_new_tokens": 20} | CASES[name]))
    ours, _ = _ours(case, options)
    expected = case.reference(**_hf_kwargs(options))
    assert ours.dtype == expected.dtype
    assert ours.shape == expected.shape, (ours, expected)
    assert torch.equal(ours, expected), (ours, expected)


@pytest.mark.parametrize("beams", [1, 4])
def test_eos_list(case, beams):
    eos = [case.eos, 29 if case.name == "t5" else 95]
    options = GenerationOptions(max_new_tokens=15, num_beams=beams)
    ours, _ = _ours(case, options, eos=eos)
    expected = case.reference(**_hf_kwargs(options) | {"eos_token_id": eos})
    assert torch.equal(ours, expected), (ours, expected)


def test_min_new_tokens_delays_eos(case):
    """min_new_tokens must actually change something here: some row would end before 5 tokens."""
    plain, _ = _ours(case, GenerationOptions(max_new_tokens=20))
    assert (plain[:, :4] == case.eos).any()
    delayed, _ = _ours(case, GenerationOptions(max_new_tokens=20, min_new_tokens=5))
    assert not (delayed[:, :5] == case.eos).any()


def test_setup_is_not_degenerate(case):
    """The widened tiny models give varied outputs; some rows end early, some run to the limit."""
    out, _ = _ours(case, GenerationOptions(max_new_tokens=20))
    ended = (out == case.eos).any(dim=1)
    assert ended.any() and not ended.all()
    assert len({tuple(row.tolist()) for row in out}) == out.shape[0]
    beams, _ = _ours(case, GenerationOptions(max_new_tokens=20, num_beams=3))
    assert not torch.equal(beams, out[:, : beams.shape[1]]) or beams.shape != out.shape


def test_no_step_after_finishing(case):
    """Greedy calls step() once per new token but the last; it stops once every row has ended."""
    out, stepper = _ours(case, GenerationOptions(max_new_tokens=20))
    assert stepper.steps == out.shape[1] - 1
    one, stepper = _ours(case, GenerationOptions(max_new_tokens=1, num_beams=3))
    assert stepper.steps == 0 and one.shape[1] == 1


def test_all_rows_end_early_stops(opt_case):
    # Row 2's first greedy token, used as EOS for a single-row call: one token, no step.
    first = _ours(opt_case, GenerationOptions(max_new_tokens=20))[0][:, 0]
    stepper = opt_case.stepper()
    stepper.select(torch.tensor([2]))
    out = generate(stepper, opt_case.ids[2:3], GenerationOptions(max_new_tokens=20), int(first[2]), 1)
    assert out.tolist() == [[int(first[2])]] and stepper.steps == 0


def test_options_are_hf_defaults():
    """The same option means the same thing: our defaults are transformers' (but max_new_tokens)."""
    from transformers import GenerationConfig

    defaults = GenerationConfig._get_default_generation_params() | {"min_new_tokens": 0}
    for field in dataclasses.fields(GenerationOptions):
        if field.name not in ("seed", "max_new_tokens"):
            assert field.default == defaults[field.name], field.name


EARLY_ROWS = {"opt": [1, 2, 3], "t5": [0, 1]}  # prompts whose best hypotheses end within a few tokens


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_beams=3),
        dict(num_beams=3, early_stopping=True),
        dict(num_beams=3, early_stopping="never"),
        dict(num_beams=3, early_stopping="never", length_penalty=0.0),
        dict(num_beams=4, length_penalty=-1.0, num_return_sequences=2),
    ],
    ids=["greedy", "beam3", "beam3-early", "beam3-never", "beam3-never-lp0", "beam4-lp-1-return2"],
)
def test_stops_when_transformers_stops(case, kwargs):
    """Same tokens, and as many model calls as transformers makes (prefill + one per step), also when the
    search ends before max_new_tokens."""
    case = case.subset(EARLY_ROWS[case.name])
    options = GenerationOptions(max_new_tokens=20, **kwargs)
    ours, stepper = _ours(case, options)
    calls = []
    hook = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        expected = case.reference(**_hf_kwargs(options))
    finally:
        hook.remove()
    assert torch.equal(ours, expected), (ours, expected)
    assert stepper.steps + 1 == len(calls)
