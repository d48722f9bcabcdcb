"""How to decode: the options of `generate`, named and defaulted as in transformers' `GenerationConfig`,
so that the same call means the same thing in both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip2.errors import InputError


@dataclass
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

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def validate(self) -> None:
        """Raise `InputError` naming the first option that is out of range or unsupported."""
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            "max_new_tokens must be an integer >= 1",
        )
        _check(
            _is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
            "min_new_tokens must be an integer >= 0",
        )
        _check(_is_int(self.num_beams) and self.num_beams >= 1, "num_beams must be an integer >= 1")
        _check(
            _is_int(self.num_return_sequences) and self.num_return_sequences >= 1,
            "num_return_sequences must be an integer >= 1",
        )
        _check(self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 turns it off)")
        _check(
            _is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
            "no_repeat_ngram_size must be an integer >= 0 (0 turns it off)",
        )
        _check(
            self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
            f"early_stopping must be True, False or 'never', not {self.early_stopping!r}",
        )
        if self.do_sample:
            _check(
                self.temperature > 0, "temperature must be > 0 when sampling (use do_sample=False for greedy)"
            )
            _check(_is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 turns it off)")
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(f"invalid generation options: {message}")
