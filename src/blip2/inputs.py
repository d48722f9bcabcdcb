"""Checking and shaping what callers pass to the task API: one item or a list, texts, image-text pairs."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError


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
    return items


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
    """One string for all n images, or one per image."""
    if isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise InputError(f"{what}: {len(values)} given for {n} images; give one, or one per image")
    for v in values:
        if not isinstance(v, str):
            raise InputError(f"{what}: expected strings, got {type(v).__name__}")
    return values
