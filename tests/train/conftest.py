"""Small training data sets (a folder of images with captions, a VQA JSONL) and config helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

CAPTIONS = [
    "a photo of a cat sitting on a red couch",
    "two dogs playing with a ball in the park",
    "a man riding a bike down the street",
    "the kitchen has a white stove",
    "a plate of food with broccoli",
    "an airplane flying over the city",
]


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory):
    """Six images with same-stem .txt captions."""
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(root / f"image{i}.png")
        (root / f"image{i}.txt").write_text(caption + "\n")
    return root


@pytest.fixture(scope="session")
def vqa_file(caption_folder):
    """A JSONL of question/answer rows over the caption folder's images."""
    path = caption_folder / "vqa.jsonl"
    rows = [
        {"image": f"image{i}.png", "question": "what is in the picture?", "answer": caption.split()[-1]}
        for i, caption in enumerate(CAPTIONS)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
