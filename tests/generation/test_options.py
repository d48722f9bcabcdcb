"""`GenerationOptions`: one frozen object, valid by construction, built from names by `from_kwargs`."""

from __future__ import annotations

import dataclasses

import pytest

from blip2.errors import InputError
from blip2.generation import GenerationOptions


def test_construction_checks_the_values():
    with pytest.raises(InputError, match="num_beams must be an integer >= 1"):
        GenerationOptions(num_beams=0)
    with pytest.raises(InputError, match="top_p must be in"):
        GenerationOptions.from_kwargs(do_sample=True, top_p=3.0)


def test_frozen():
    options = GenerationOptions(num_beams=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_beams = 0  # type: ignore[misc]
    # A changed copy is built, so checked, again.
    with pytest.raises(InputError, match="num_beams"):
        dataclasses.replace(options, num_beams=0)


def test_from_kwargs_refuses_unknown_names_and_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown generation option\\(s\\): beams, max_length") as error:
        GenerationOptions.from_kwargs(beams=3, max_length=9, num_beams=2)
    for field in dataclasses.fields(GenerationOptions):
        assert field.name in str(error.value)


def test_from_kwargs_is_the_constructor_for_known_names():
    given = dict(num_beams=4, max_new_tokens=7, early_stopping="never", length_penalty=-1.0)
    assert GenerationOptions.from_kwargs(**given) == GenerationOptions(**given)
    assert GenerationOptions.from_kwargs() == GenerationOptions()
