"""Tiny checkpoints, written once per session by transformers' own save_pretrained (see blip2.testing)."""

from __future__ import annotations

import warnings

import pytest
import torch

from blip2.testing import build_checkpoint, build_instructblip_checkpoint, build_retrieval_checkpoint

warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: threads only contend (tens of times slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Paths of the tiny checkpoints: opt and t5, single-file and sharded."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "opt": build_checkpoint(root / "opt", "opt"),
        "opt-sharded": build_checkpoint(root / "opt-sharded", "opt", sharded=True, seed=1),
        "t5": build_checkpoint(root / "t5", "t5"),
        "t5-sharded": build_checkpoint(root / "t5-sharded", "t5", sharded=True, seed=1),
    }


@pytest.fixture(scope="session")
def instruct_checkpoints(tmp_path_factory):
    """Tiny InstructBLIP checkpoints with OPT, Flan-T5 and LLaMA (Vicuna) language models."""
    root = tmp_path_factory.mktemp("instructblip")
    return {lm: build_instructblip_checkpoint(root / lm, lm) for lm in ("opt", "t5", "llama")}


@pytest.fixture(scope="session")
def retrieval_checkpoints(tmp_path_factory):
    """Tiny image-text retrieval checkpoints (blip2-itm-vit-g style), without and with an image token."""
    root = tmp_path_factory.mktemp("retrieval")
    return {
        "plain": build_retrieval_checkpoint(root / "plain"),
        "image-token": build_retrieval_checkpoint(root / "image-token", image_token_index=True, seed=1),
    }


@pytest.fixture(scope="session")
def oracle():
    """Load transformers' model and processor from a checkpoint directory (cached per path)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    cache = {}

    def get(path):
        if path not in cache:
            model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            cache[path] = (model, Blip2Processor.from_pretrained(path))
        return cache[path]

    return get


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A few real photographs (scikit-image ships them) saved as files, plus one odd-sized synthetic image."""
    import numpy as np
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = root / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path, quality=92)
        paths.append(path)
    rng = np.random.default_rng(0)
    noise = root / "noise.png"
    Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8)).save(noise)
    paths.append(noise)
    return paths
