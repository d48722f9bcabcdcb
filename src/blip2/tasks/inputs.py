"""Checking and shaping what callers pass to the task API: one item or a list, texts, image-text pairs."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError


def is_list(x) -> bool:
    return isinstance(x, (list, tuple))


def as_list(x, what: str) -> list:
    """One item -> [item]; a list -> itself. An empty list is an error naming `what`."""
    items = list(x) if is_list(x) else [x]
    if not items:
        raise InputError(f"{what}: the list is empty")
    return items


def texts(x, what: str = "texts") -> list[str]:
    """One text or a list of them, each a non-empty string."""
    items = as_list(x, what)
    for t in items:
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"{what} must be non-empty strings, got {t!r}")
        check_text(t, what)
    return items


def check_text(value: str, what: str) -> str:
    """`value` itself if it can be tokenized: a string of characters, none of them a lone surrogate (what
    Python makes of argv or file bytes that are not UTF-8; the tokenizer would fail on it with a raw error)."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__} {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{what}: {value[e.start]!r} at position {e.start} is a lone surrogate, not a character "
            "(was the text decoded from bytes that are not UTF-8?)"
        ) from None
    return value


def template(value, what: str = "template") -> str:
    """A prompt template: a string with a `{}` where the text goes (see `fill`)."""
    check_text(value, what)
    if "{}" not in value:
        raise InputError(f"{what} {value!r} has no '{{}}' where the text goes")
    return value


def fill(template: str, text: str) -> str:
    """The template rule: the first `{}` is replaced by `text`; every other brace is kept as written
    ("Q: {} {x}" -> "Q: <text> {x}"). Not `str.format`, for which stray braces are errors."""
    return template.replace("{}", text, 1)


def pairs(n_images: int, items: list[str], what: str = "texts") -> tuple[list[int], list[str]]:
    """Pair images with texts: one image with every text, every image with one text, or one to one.
    Returns the image row of each pair and the text of each pair."""
    if n_images == 1:
        return [0] * len(items), items
    if len(items) == 1:
        return list(range(n_images)), items * n_images
    if len(items) == n_images:
        return list(range(n_images)), items
    raise InputError(
        f"{n_images} images and {len(items)} {what}: give one image, one of the {what}, or the same number of each"
    )


def broadcast(value: str | Sequence[str], n: int, what: str) -> list[str]:
    """One string for all n images, or one per image (strings may be empty)."""
    if isinstance(value, str):
        return [check_text(value, what)] * n
    if not is_list(value):
        raise InputError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    values = list(value)
    if len(values) != n:
        raise InputError(f"{what}: {len(values)} given for {n} images; give one, or one per image")
    return [check_text(v, what) for v in values]
