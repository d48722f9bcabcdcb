"""Fixtures of the Index tests (test_index.py, test_index_cli.py, test_index_inputs.py): a loaded tiny
retrieval checkpoint (and the same with its image embeddings counted) and a folder of the sample photos to
index."""

from __future__ import annotations

import shutil

import pytest

import blip2


@pytest.fixture(scope="module")
def itm(retrieval_checkpoints):
    return blip2.load(retrieval_checkpoints["plain"], device="cpu")


@pytest.fixture
def counted(itm, monkeypatch):
    """The model, its image embeddings counted (images run through it)."""
    calls = []
    embed = itm.embed_images

    def counting(images):
        calls.extend(images)
        return embed(images)

    monkeypatch.setattr(itm, "embed_images", counting)
    return itm, calls


@pytest.fixture
def folder(tmp_path, photos):
    """The sample photos copied into a folder of their own (tests move and change them there)."""
    root = tmp_path / "photos"
    root.mkdir()
    for photo in photos:
        shutil.copy(photo, root / photo.name)
    return root
