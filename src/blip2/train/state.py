"""Training checkpoints: what a run needs to continue exactly where it stopped, and nothing that executes.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding `state.safetensors` (the trainable weights, the
optimizer's moments and step counts, the random generators' states) and `state.json` (step, data position,
skipped count). It is written to `step-NNNNNNNN.tmp/`, synced and renamed: a folder without `.tmp` is
complete, whatever moment a kill came at. No pickle: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..files import read_json
from .export import staging

STEP_DIR = re.compile(r"^step-(\d{8})$")
MOMENTS = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class Progress:
    """Where a run is: optimizer steps done, the data stream's epoch and offset, rows skipped so far."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    skipped: int = 0


@dataclass
class Generators:
    """The random generators a run draws from: ITM negatives and augmentation (CPU), plus torch's global ones."""

    negatives: torch.Generator
    augment: torch.Generator

    def state(self) -> dict[str, Tensor]:
        out = {
            "rng/negatives": self.negatives.get_state(),
            "rng/augment": self.augment.get_state(),
            "rng/torch": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            out["rng/cuda"] = torch.cuda.get_rng_state()
        return out

    def restore(self, state: dict[str, Tensor]) -> None:
        self.negatives.set_state(state["rng/negatives"])
        self.augment.set_state(state["rng/augment"])
        torch.random.set_rng_state(state["rng/torch"])
        if "rng/cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng/cuda"])


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save(
    root: Path,
    progress: Progress,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    generators: Generators,
    keep: int,
) -> Path:
    """Write a checkpoint of the run at `progress` under `root`, atomically; keep the newest `keep`."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {f"param/{name}": p.detach() for name, p in params.items()}
    for name, p in params.items():
        for moment, value in optimizer.state.get(p, {}).items():
            tensors[f"optim/{name}/{moment}"] = value
    tensors.update(generators.state())
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    folder = step_folder(root, progress.step)
    with staging(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(progress.__dict__) + "\n")
    for old in sorted(completed(root))[:-keep]:
        shutil.rmtree(step_folder(root, old), ignore_errors=True)
    return folder


def completed(root: Path) -> list[int]:
    """Steps of the complete checkpoints under `root`, oldest first (unfinished `.tmp` folders are not)."""
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(steps)


def restore(
    folder: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    generators: Generators,
) -> Progress:
    """Load the checkpoint `folder` into the parameters, the optimizer and the generators; returns its progress.
    A checkpoint of another model or config (a missing or extra tensor, another shape) is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / "state.safetensors"
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: not a readable training checkpoint ({e})") from None
    progress = _progress(folder / "state.json")
    expected = {f"param/{name}" for name in params}
    found = {k for k in tensors if k.startswith("param/")}
    if expected != found:
        differ = sorted(expected ^ found)[:3]
        raise CheckpointError(f"{file}: its trainable weights are not this run's ({', '.join(differ)}, ...)")
    with torch.no_grad():
        for name, p in params.items():
            saved = tensors[f"param/{name}"]
            if saved.shape != p.shape or saved.dtype != p.dtype:
                raise CheckpointError(
                    f"{file}: {name} is {tuple(saved.shape)} {saved.dtype}, the model's {tuple(p.shape)}"
                )
            p.copy_(saved)
    for name, p in params.items():
        moments = {m: tensors[f"optim/{name}/{m}"] for m in MOMENTS if f"optim/{name}/{m}" in tensors}
        if moments:
            optimizer.state[p] = {m: v.to(p.device) if m != "step" else v for m, v in moments.items()}
    try:
        generators.restore(tensors)
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{file}: bad random generator state ({e})") from None
    return progress


def _progress(file: Path) -> Progress:
    data = read_json(file)
    fields = Progress.__dataclass_fields__
    values = {k: data.get(k) for k in fields}
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values.values()):
        raise CheckpointError(f"{file}: needs non-negative integers {', '.join(fields)}")
    return Progress(**values)  # type: ignore[arg-type]
