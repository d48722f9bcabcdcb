"""The training config: one YAML file (or the same as a dict) per stage, checked field by field before
anything loads.

Schema (only `stage`, `model`, `data` and `run_dir` are required; relative paths are relative to the YAML
file's folder, or to the working directory for a dict)::

    stage: 1                 # 1: Q-Former representation learning (ITC + ITM + ITG) on a retrieval
                             #    checkpoint (Blip2ForImageTextRetrieval, BERT tokenizer)
                             # 2: the language-model loss on a checkpoint with a language model (OPT, Flan-T5)
    model: path/to/checkpoint    # a checkpoint directory in the Hugging Face layout (see new_checkpoint)
    init_from: path/to/stage1    # optional: take vision_model.*, query_tokens, qformer.* (and embeddings.*)
                                 # from this checkpoint (e.g. stage 1's output) where `model` has them
    init_parts: [vision, qformer]    # which of those init_from copies: vision (vision_model.*), qformer
                             # (query_tokens, qformer.*, embeddings.*). Default both
    data: path               # or a list of paths: a folder of images with same-stem .txt captions (one
                             # caption per non-empty line), or a .jsonl / .parquet file of rows
                             # {image, caption} or (stage 2) {image, question, answer}; image paths are
                             # relative to the file's folder and may not leave it
    run_dir: path            # checkpoints/, losses.csv and the final export output/ (HF layout)
    trainable: [qformer, projections]   # which parts train; any of vision, qformer (with the query tokens,
                             # the Q-Former's text embeddings and the ITG head), projections (ITC projections
                             # and temperature, ITM head, language projection), language_model.
                             # Default, as the paper: [qformer, projections] in both stages
    steps: 1000              # optimizer steps in all
    batch_size: 8            # pairs per micro-batch (stage 1: at least 2, for in-batch negatives)
    grad_accum: 1            # micro-batches per optimizer step
    lr: 1.0e-4               # peak learning rate, after warmup
    min_lr: 1.0e-5           # cosine decay ends here at the last step
    warmup_lr: 1.0e-6        # linear warmup starts here ...
    warmup_steps: 0          # ... and reaches lr after this many steps
    weight_decay: 0.05       # AdamW; never on biases, norms, the temperature (1-d parameters, as LAVIS)
    betas: [0.9, 0.999]
    max_grad_norm: null      # clip the global gradient norm when set
    seed: 42
    device: auto             # auto (cuda when available), cpu, cuda, cuda:1, ...
    precision: auto          # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    threads: null            # torch CPU threads (set it for bitwise-reproducible CPU runs across machines)
    gradient_checkpointing: false    # recompute each transformer block's activations in backward
    cache_vision: auto       # auto: run the frozen vision tower once per image and keep its output in
                             # memory (only when vision is frozen and augment is none)
    augment: none            # none | lavis (random resized crop, scale 0.5-1, and horizontal flip). Default
                             # none: training sees images exactly as inference does, the frozen vision tower
                             # can be cached, and a flip would contradict captions that say left or right
    max_text_length: 32      # tokens per text (LAVIS's max_txt_len), longer texts are truncated
    prompt: ""               # stage 2, captions: the prompt before the caption (OPT) / the encoder input (T5)
    checkpoint_every: 100    # steps between checkpoints (atomic; resume with --resume)
    keep_checkpoints: 2      # the newest this many are kept
    progress: true           # a progress bar on stderr
    tensorboard: false       # also log to run_dir/tensorboard (needs the tensorboard package)

Every error is an `InputError` naming the field (`TrainConfigError`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError

PARTS = ("vision", "qformer", "projections", "language_model")
INIT_PARTS = ("vision", "qformer")  # what init_from can copy
DEFAULT_TRAINABLE = {1: ("qformer", "projections"), 2: ("qformer", "projections")}
MAX_CONFIG_BYTES = 1 << 20


class TrainConfigError(InputError):
    """A training config field is missing, of the wrong type or out of bounds. The message names the field."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: int
    model: Path
    data: tuple[Path, ...]
    run_dir: Path
    init_from: Path | None = None
    init_parts: tuple[str, ...] = INIT_PARTS
    trainable: tuple[str, ...] = ()
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    gradient_checkpointing: bool = False
    cache_vision: str = "auto"
    augment: str = "none"
    max_text_length: int = 32
    prompt: str = ""
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = False

    @property
    def output(self) -> Path:
        """Where the trained checkpoint is exported (Hugging Face layout)."""
        return self.run_dir / "output"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def _fail(field: str, problem: str) -> TrainConfigError:
    return TrainConfigError(f"training config: {field}: {problem}")


def _int(field: str, value: Any, low: int, high: int = 2**62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(field, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def _float(field: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, f"must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise _fail(field, f"must be in [{low}, {high}], got {value!r}")
    return float(value)


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, f"must be true or false, got {value!r}")
    return value


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(field, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _path(field: str, value: Any, base: Path) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _fail(field, f"must be a path, got {value!r}")
    return base / Path(value)


def _device(value: Any) -> str:
    if not isinstance(value, str) or not (value in ("auto", "cpu", "mps") or value.split(":")[0] == "cuda"):
        raise _fail("device", f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _parts(field: str, value: Any, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A non-empty list of `choices`, duplicates dropped (trainable, init_parts)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(field, f"must be a non-empty list of {', '.join(choices)}, got {value!r}")
    for part in value:
        _choice(field, part, choices)
    return tuple(dict.fromkeys(value))


def _betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail("betas", f"must be two numbers in [0, 1), got {value!r}")
    return (_float("betas", value[0], 0.0, 0.9999999), _float("betas", value[1], 0.0, 0.9999999))


def _prompt(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 10_000:
        raise _fail("prompt", f"must be a string (at most 10000 characters), got {value!r:.60}")
    return value


def parse_config(data: Mapping[str, Any], base: Path = Path(".")) -> TrainConfig:
    """A `TrainConfig` from a parsed YAML/dict config; relative paths are taken from `base`."""
    if not isinstance(data, Mapping):
        raise TrainConfigError(f"training config must be a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise _fail(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
    if data.get("stage") is None:
        raise _fail("stage", "is required")
    stage = _int("stage", data["stage"], 1, 2)
    for name in ("model", "data", "run_dir"):
        if data.get(name) is None:
            raise _fail(name, "is required")
    raw_data = data["data"]
    data_paths = raw_data if isinstance(raw_data, (list, tuple)) else [raw_data]
    if not data_paths:
        raise _fail("data", "needs at least one path")
    checks: dict[str, Any] = {
        "steps": lambda v: _int("steps", v, 1),
        "batch_size": lambda v: _int("batch_size", v, 2 if stage == 1 else 1, 1 << 16),
        "grad_accum": lambda v: _int("grad_accum", v, 1, 1 << 16),
        "lr": lambda v: _float("lr", v, 0.0, 1.0),
        "min_lr": lambda v: _float("min_lr", v, 0.0, 1.0),
        "warmup_lr": lambda v: _float("warmup_lr", v, 0.0, 1.0),
        "warmup_steps": lambda v: _int("warmup_steps", v, 0),
        "weight_decay": lambda v: _float("weight_decay", v, 0.0, 10.0),
        "betas": _betas,
        "max_grad_norm": lambda v: None if v is None else _float("max_grad_norm", v, 1e-12),
        "seed": lambda v: _int("seed", v, 0, 2**63 - 1),
        "device": _device,
        "precision": lambda v: _choice("precision", v, ("auto", "fp32", "bf16")),
        "threads": lambda v: None if v is None else _int("threads", v, 1, 1024),
        "gradient_checkpointing": lambda v: _bool("gradient_checkpointing", v),
        "cache_vision": lambda v: _choice("cache_vision", str(v).lower(), ("auto", "true", "false")),
        "augment": lambda v: _choice("augment", v, ("none", "lavis")),
        "max_text_length": lambda v: _int("max_text_length", v, 2, 4096),
        "prompt": _prompt,
        "checkpoint_every": lambda v: _int("checkpoint_every", v, 1),
        "keep_checkpoints": lambda v: _int("keep_checkpoints", v, 1, 1000),
        "progress": lambda v: _bool("progress", v),
        "tensorboard": lambda v: _bool("tensorboard", v),
        "trainable": lambda v: _parts("trainable", v, PARTS),
        "init_parts": lambda v: _parts("init_parts", v, INIT_PARTS),
    }
    fields = {name: check(data[name]) for name, check in checks.items() if data.get(name) is not None}
    fields.setdefault("trainable", DEFAULT_TRAINABLE[stage])
    if fields.get("cache_vision") == "true" and (
        "vision" in fields["trainable"] or fields.get("augment", "none") != "none"
    ):
        raise _fail("cache_vision", "true needs a frozen vision tower and augment: none")
    init_from = data.get("init_from")
    if init_from is None and data.get("init_parts") is not None:
        raise _fail("init_parts", "needs init_from (the checkpoint to copy the parts from)")
    return TrainConfig(
        stage=stage,
        model=_path("model", data["model"], base),
        data=tuple(_path("data", p, base) for p in data_paths),
        run_dir=_path("run_dir", data["run_dir"], base),
        init_from=None if init_from is None else _path("init_from", init_from, base),
        **fields,
    )


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> TrainConfig:
    """A `TrainConfig` from a YAML file (relative paths from its folder) or a dict (from the working directory)."""
    if isinstance(config, Mapping):
        return parse_config(config)
    path = Path(config)
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise TrainConfigError(
            "reading a YAML training config needs pyyaml (pip install 'blip2[train]')"
        ) from None
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise TrainConfigError(f"{path}: cannot read the training config ({e.strerror or e})") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise TrainConfigError(f"{path}: a training config is at most {MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
    try:
        return parse_config(data, path.parent)
    except TrainConfigError as e:
        raise TrainConfigError(f"{path}: {e}") from None
