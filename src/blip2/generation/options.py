"""How to decode: the options of `generate`, named and defaulted as in transformers' `GenerationConfig`,
so that the same call means the same thing in both.

`GenerationOptions` is one frozen, typed object that is valid by construction: it is checked once, where it
is built (the API's keywords, the CLI's flags, a server's or a batch job's JSON, all through `from_kwargs`),
and then travels as is through the tasks, the engine and the decoding loops, which do not check it again."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Literal

from blip2.errors import InputError


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 30
    min_new_tokens: int = 0  # EOS is forbidden until this many tokens are generated
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0  # sampling only, as top_k and top_p
    top_k: int = 50  # 0 turns it off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0  # beam search: finished scores are divided by length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # beam search, as transformers
    num_return_sequences: int = 1
    seed: int | None = None  # sampling: a seeded call is reproducible

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_kwargs(cls, **options: Any) -> GenerationOptions:
        """Build from options given by name (API keywords, CLI flags, JSON), the others defaulted. An
        `InputError` names any unknown option and lists the known ones, or names the first bad value."""
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise InputError(
                f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(sorted(OPTION_NAMES))})"
            )
        return cls(**options)

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def validate(self) -> None:
        """Raise `InputError` naming the first option that has the wrong type, is out of range or is
        unsupported. Types are checked whatever the mode (a `temperature="hot"` is wrong even for greedy
        decoding), ranges where the option is used. `seed` must be what `torch.Generator.manual_seed`
        accepts: an integer in [-2**63, 2**64 - 1]."""
        for name, kind in OPTION_KINDS.items():
            value = getattr(self, name)
            _check(_KIND_CHECKS[kind](value), f"{name} must be {kind}, got {value!r}")
        _check(self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1")
        _check(self.min_new_tokens >= 0, "min_new_tokens must be an integer >= 0")
        _check(
            self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})",
        )
        _check(self.num_beams >= 1, "num_beams must be an integer >= 1")
        _check(self.num_return_sequences >= 1, "num_return_sequences must be an integer >= 1")
        _check(self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 turns it off)")
        _check(
            self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be an integer >= 0 (0 turns it off)"
        )
        _check(
            self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
            f"early_stopping must be True, False or 'never', not {self.early_stopping!r}",
        )
        _check(
            self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
            f"seed must be None or an integer in [-2**63, 2**64 - 1] (torch.Generator), got {self.seed!r}",
        )
        if self.do_sample:
            _check(
                self.temperature > 0, "temperature must be > 0 when sampling (use do_sample=False for greedy)"
            )
            _check(self.top_k >= 0, "top_k must be an integer >= 0 (0 turns it off)")
            _check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
            _check(not self.is_beam_search, "sampling with num_beams > 1 (beam sampling) is not supported")
        if self.is_beam_search:
            _check(
                self.num_return_sequences <= self.num_beams,
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})",
            )
        elif not self.do_sample:
            _check(
                self.num_return_sequences == 1,
                "greedy decoding returns one sequence per input: num_return_sequences must be 1 "
                "(use beams or sampling for more)",
            )


# The type of each option, checked before any range: a string "10" or a float 2.0 where an integer is meant
# would otherwise fail deep in the decoding loop, or (a NaN) silently change every comparison.
OPTION_KINDS = {
    "max_new_tokens": "an integer",
    "min_new_tokens": "an integer",
    "num_beams": "an integer",
    "top_k": "an integer",
    "no_repeat_ngram_size": "an integer",
    "num_return_sequences": "an integer",
    "do_sample": "True or False",
    "temperature": "a finite number",
    "top_p": "a finite number",
    "repetition_penalty": "a finite number",
    "length_penalty": "a finite number",
    "seed": "an integer or None",
}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
OPTION_NAMES = frozenset(field.name for field in fields(GenerationOptions))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


_KIND_CHECKS = {
    "an integer": _is_int,
    "True or False": lambda value: isinstance(value, bool),
    "a finite number": _is_finite_number,
    "an integer or None": lambda value: value is None or _is_int(value),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(f"invalid generation options: {message}")
