"""Sampling (reproducible when seeded; not token-identical to transformers, whose RNG use differs) and
option validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2.errors import InputError
from blip2.generation import GenerationOptions, generate


def _run(case, **kwargs) -> torch.Tensor:
    options = GenerationOptions(**({"max_new_tokens": 15} | kwargs))
    mask = case.mask if case.name == "opt" else None
    return generate(case.stepper(), case.history, options, case.eos, case.pad, attention_mask=mask)


def test_seeded_sampling_is_reproducible(case):
    first = _run(case, do_sample=True, seed=7, top_k=0, temperature=1.5)
    assert torch.equal(first, _run(case, do_sample=True, seed=7, top_k=0, temperature=1.5))
    others = [_run(case, do_sample=True, seed=seed, top_k=0, temperature=1.5) for seed in (8, 9)]
    assert any(o.shape != first.shape or not torch.equal(o, first) for o in others)


def test_top_k_1_is_greedy(case):
    assert torch.equal(_run(case, do_sample=True, top_k=1, seed=3), _run(case))


def test_tiny_top_p_is_greedy(case):
    # Only the most likely token survives a nucleus this small (our scores have no exact ties).
    assert torch.equal(_run(case, do_sample=True, top_p=1e-6, seed=3), _run(case))


def test_sampling_num_return_sequences(case):
    out = _run(case, do_sample=True, seed=1, top_k=0, temperature=2.0, num_return_sequences=3)
    assert out.shape[0] == case.ids.shape[0] * 3
    # Copies of one input are consecutive, as in transformers, and (hot temperature) not all the same.
    copies = out.view(case.ids.shape[0], 3, -1)
    assert any(not torch.equal(group[0], group[1]) or not torch.equal(group[0], group[2]) for group in copies)


def test_sampled_rows_are_padded_after_eos(opt_case):
    out = _run(opt_case, do_sample=True, seed=0, num_return_sequences=4)
    for row in out.tolist():
        if opt_case.eos in row:
            end = row.index(opt_case.eos)
            assert all(t == opt_case.pad for t in row[end + 1 :])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_return_sequences=0), "num_return_sequences"),
        (dict(num_beams=3, num_return_sequences=4), "num_return_sequences"),
        (dict(num_return_sequences=2), "num_return_sequences must be 1"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(do_sample=True, num_beams=2), "beam sampling"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(early_stopping="always"), "early_stopping"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens="10"), "max_new_tokens must be an integer, got '10'"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
        (dict(num_beams=2.0), "num_beams must be an integer, got 2.0"),
        (dict(do_sample="yes"), "do_sample must be True or False, got 'yes'"),
        (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
        (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number, got nan"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number"),
        (dict(do_sample=True, top_p=float("nan")), "top_p must be a finite number"),
        (
            dict(min_new_tokens=20, max_new_tokens=10),
            r"min_new_tokens \(20\) must be <= max_new_tokens \(10\)",
        ),
        (dict(do_sample=True, seed=2**64), "seed must be None or an integer"),
        (dict(do_sample=True, seed=-(2**63) - 1), "seed must be None or an integer"),
        (dict(do_sample=True, seed="1"), "seed must be an integer or None"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        GenerationOptions(**kwargs).validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_beams=4, num_return_sequences=4, early_stopping="never"),
        dict(do_sample=True, num_return_sequences=5, temperature=0.5, top_k=0, top_p=0.9),
        dict(temperature=0.0),  # ignored without sampling, as in transformers
        dict(do_sample=True, seed=2**64 - 1),
        dict(do_sample=True, seed=-(2**63)),
        dict(min_new_tokens=10, max_new_tokens=10),
        dict(num_beams=np.int64(3), length_penalty=np.float32(-1.0)),  # numpy numbers are numbers
    ],
)
def test_valid_options(kwargs):
    GenerationOptions(**kwargs).validate()


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_seed_bounds_are_what_torch_accepts(seed, opt_case):
    """The bounds `validate` allows are exactly torch.Generator's: the extreme seeds run."""
    out = _run(opt_case, do_sample=True, seed=seed, max_new_tokens=3)
    assert out.shape[0] == opt_case.history.shape[0]


def test_generate_checks_inputs(opt_case):
    with pytest.raises(InputError, match="history"):
        generate(opt_case.stepper(), opt_case.ids[0], GenerationOptions(), 2, 1)
    with pytest.raises(InputError, match="attention_mask"):
        generate(
            opt_case.stepper(), opt_case.ids, GenerationOptions(), 2, 1, attention_mask=opt_case.mask[:, 1:]
        )
    with pytest.raises(InputError, match="eos"):
        generate(opt_case.stepper(), opt_case.ids, GenerationOptions(), [], 1)
    with pytest.raises(InputError, match="rows"):
        generate(opt_case.stepper(), opt_case.ids[:2], GenerationOptions(), 2, 1)
    with pytest.raises(InputError, match="num_beams"):
        generate(opt_case.stepper(), opt_case.ids, GenerationOptions(num_beams=0), 2, 1)
