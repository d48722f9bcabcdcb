"""Rewrite a tiny Hugging Face checkpoint directory into the layouts the released BLIP-2 files come in.

The session fixtures are written by transformers 5. The files users have on disk are older: the 2023
`pytorch_model-0000x-of-0000y.bin` shards with `pytorch_model.bin.index.json`; safetensors from the Hub's
conversion bot, which keeps a tied tensor under one of its names only; LLaMA files from transformers <= 4.31,
with `rotary_emb.inv_freq` buffers. Each helper copies nothing: call it on a copy (`copy_checkpoint`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def weight_files(directory: Path) -> list[Path]:
    """Every weights file and index in `directory` (safetensors or .bin)."""
    patterns = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*")
    return sorted(p for pattern in patterns for p in directory.glob(pattern))


def read_state(directory: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors checkpoint, single file or shards."""
    state = {}
    for file in sorted(directory.glob("model*.safetensors")):
        state.update(load_file(file))
    return state


def write_safetensors(directory: Path, state: dict[str, Tensor]) -> None:
    """Replace the weights of `directory` by one model.safetensors holding `state`."""
    for file in weight_files(directory):
        file.unlink()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def to_bin_shards(directory: Path, shards: int = 3) -> list[Path]:
    """The 2023 layout: torch.save'd state-dict shards named by pytorch_model.bin.index.json."""
    state = read_state(directory)
    for file in weight_files(directory):
        file.unlink()
    keys = sorted(state)
    names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        torch.save({k: state[k] for k in keys if weight_map[k] == name}, directory / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return [directory / name for name in names]


def keep_one_alias(directory: Path, names: tuple[str, ...], keep: str) -> None:
    """Store one tensor known under several `names` (tied or shared) under `keep` only, as the conversion
    bot does with whichever name sorts first."""
    state = read_state(directory)
    tensor = next(state[n] for n in names if n in state)
    for n in names:
        state.pop(n, None)
    state[keep] = tensor.clone()
    write_safetensors(directory, state)


def add_rotary_buffers(directory: Path, layers: int, head_dim: int, theta: float = 10000.0) -> None:
    """LLaMA files from transformers <= 4.31 carry each layer's rotary frequencies as a buffer."""
    state = read_state(directory)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for i in range(layers):
        state[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    write_safetensors(directory, state)


def edit_config(directory: Path, **text_config) -> None:
    """Set fields of config.json's text_config."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["text_config"].update(text_config)
    path.write_text(json.dumps(config))
