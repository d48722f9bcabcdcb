"""The training loop: AdamW with linear warmup and cosine decay, gradient accumulation, bf16 autocast on CUDA,
optional gradient checkpointing, a cache of the frozen vision tower, atomic checkpoints that a resumed run
continues bitwise (on the CPU), a progress bar, a CSV log of the losses, and the export of the result.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import Blip2Error, CheckpointError, InputError
from ..loading.loader import Checkpoint, load_directory, parse_device
from ..models.blip2 import Blip2ForConditionalGeneration
from ..models.llama import LlamaDecoderLayer
from ..models.opt import OPTDecoderLayer
from ..models.qformer import QFormerLayer
from ..models.registry import family
from ..models.retrieval import Blip2ForImageTextRetrieval
from ..models.t5 import T5Block
from ..models.vision import VisionBlock
from . import batches, state
from .config import TrainConfig, load_config
from .data import Position, Row, Rows, load_pixels, read_rows, stream
from .export import copy_pretrained, export
from .objectives import Stage1Objective, Stage2Objective

# Which part of the model a parameter belongs to, by name prefix (names of the objective: the model's under
# "model.", the objective's own ITG head and temperature at the top).
PART_PREFIXES = {
    "vision": ("model.vision_model.",),
    "qformer": ("model.qformer.", "model.query_tokens", "model.embeddings.", "itg_head."),
    "projections": (
        "model.vision_projection.",
        "model.text_projection.",
        "model.itm_head.",
        "model.language_projection.",
        "temp",
    ),
    "language_model": ("model.language_model.",),
}
CHECKPOINTED_BLOCKS = (VisionBlock, QFormerLayer, OPTDecoderLayer, T5Block, LlamaDecoderLayer)
LOG_FILE = "losses.csv"


def part_of(name: str) -> str:
    for part, prefixes in PART_PREFIXES.items():
        if name.startswith(prefixes):
            return part
    raise AssertionError(f"parameter {name} belongs to no part")


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear from warmup_lr to lr over warmup_steps,
    then a cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / config.warmup_steps
    span = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(params: Mapping[str, nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as LAVIS makes them: no weight decay on 1-d parameters (biases, norms, the temperature)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_trainable(objective: nn.Module, parts: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """requires_grad on the parameters of `parts` only; returns them by name."""
    trainable = {}
    for name, p in objective.named_parameters():
        p.requires_grad_(part_of(name) in parts)
        if p.requires_grad:
            trainable[name] = p
    return trainable


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: every transformer block recomputes its activations in backward. The blocks'
    forwards are wrapped per instance, so parameter names (and the export) do not change."""
    for module in model.modules():
        if isinstance(module, CHECKPOINTED_BLOCKS):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)  # type: ignore[method-assign]


def resolve_device(name: str) -> torch.device:
    return parse_device(None if name == "auto" else name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto or bf16); float32 elsewhere."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class Run:
    """Everything a run holds, built once from the config."""

    config: TrainConfig
    checkpoint: Checkpoint
    objective: Stage1Objective | Stage2Objective
    trainable: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    rows: Rows
    image_ids: dict[Path, int]
    make_text: Callable[[list[Row]], Any]
    generators: state.Generators
    cache: dict[Path, Tensor] | None


def build_objective(config: TrainConfig, checkpoint: Checkpoint) -> Stage1Objective | Stage2Objective:
    model = checkpoint.model
    if config.stage == 1:
        if not isinstance(model, Blip2ForImageTextRetrieval):
            raise InputError(
                f"model: stage 1 trains an image-text retrieval checkpoint; {config.model} has a language model"
            )
        bos = checkpoint.processors.text.bos_id
        if bos is None:
            raise CheckpointError(
                f"{config.model}: its tokenizer names no bos_token (the [DEC] token of ITG)"
            )
        return Stage1Objective(model, bos)
    if not isinstance(model, Blip2ForConditionalGeneration) or checkpoint.config.model_type != "blip-2":
        raise InputError(
            f"model: stage 2 trains a BLIP-2 checkpoint with a language model; {config.model} is not one"
        )
    return Stage2Objective(model, family(checkpoint.config.text).is_encoder_decoder)


def text_maker(
    config: TrainConfig, checkpoint: Checkpoint, image_ids: dict[Path, int]
) -> Callable[[list[Row]], Any]:
    text = checkpoint.processors.text
    n = config.max_text_length
    if config.stage == 1:
        return lambda rows: batches.stage1_batch(rows, text, [image_ids[r.image] for r in rows], n)
    lm = family(checkpoint.config.text)
    make = batches.encoder_decoder_batch if lm.is_encoder_decoder else batches.decoder_only_batch
    return lambda rows: make(rows, text, config.prompt, lm.ask_template, n)


def prepare(config: TrainConfig, resume: bool) -> tuple[Run, state.Progress]:
    """Load the model and data, set what trains, build the optimizer, and restore the newest checkpoint when
    resuming. Nothing is loaded before the config and the run folder are known to be right."""
    checkpoints = config.checkpoints
    existing = state.completed(checkpoints)
    if existing and not resume:
        raise InputError(
            f"run_dir: {config.run_dir} holds checkpoints already; resume it (--resume) or choose another run_dir"
        )
    config.run_dir.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    rows = read_rows(list(config.data), config.stage)  # the data's errors before the model loads
    torch.manual_seed(config.seed)
    ckpt = load_directory(Path(config.model), device, torch.float32)
    if config.init_from is not None:
        copy_pretrained(ckpt.model, Path(config.init_from), config.init_parts)
    objective = build_objective(config, ckpt)
    trainable = set_trainable(objective, config.trainable)
    if config.gradient_checkpointing:
        checkpoint_blocks(objective)
    optimizer = torch.optim.AdamW(
        parameter_groups(trainable, config.weight_decay), lr=config.lr, betas=config.betas, eps=1e-8
    )
    image_ids: dict[Path, int] = {}
    for row in rows.rows:
        image_ids.setdefault(row.image, len(image_ids))
    generators = state.Generators(
        torch.Generator().manual_seed(config.seed + 1), torch.Generator().manual_seed(config.seed + 2)
    )
    use_cache = config.cache_vision == "true" or (
        config.cache_vision == "auto" and "vision" not in config.trainable and config.augment == "none"
    )
    run = Run(
        config,
        ckpt,
        objective,
        trainable,
        optimizer,
        rows,
        image_ids,
        text_maker(config, ckpt, image_ids),
        generators,
        None,
    )
    if use_cache:
        run.cache = vision_cache(run)
    progress = state.Progress(skipped=rows.skipped)
    if existing:
        progress = state.restore(
            state.step_folder(checkpoints, existing[-1]), trainable, optimizer, generators
        )
    return run, progress


def vision_cache(run: Run) -> dict[Path, Tensor]:
    """The frozen vision tower's output for every image, computed once, in a fixed order and batching (the same
    in a resumed run); rows whose image does not decode are dropped (and counted)."""
    model = run.objective.model
    config = run.checkpoint.processors.image_config
    device = run.checkpoint.device
    paths = list(run.image_ids)
    cache: dict[Path, Tensor] = {}
    for start in range(0, len(paths), run.config.batch_size):
        chunk, pixels = [], []
        for path in paths[start : start + run.config.batch_size]:
            try:
                pixels.append(load_pixels(path, config, "none", None))
                chunk.append(path)
            except Blip2Error as e:
                run.rows.skip(str(e))
        if not chunk:
            continue
        with torch.no_grad(), autocast(device, run.config.precision):
            embeds = model.encode_images(torch.stack(pixels).to(device))
        cache.update(zip(chunk, embeds.float()))
    kept = [row for row in run.rows.rows if row.image in cache]
    if not kept:
        raise InputError("data: no image could be read")
    run.rows.rows = kept
    return cache


def next_rows(
    run: Run, indices: Iterator[int], progress: state.Progress, bad: set[Path]
) -> tuple[list[Row], Tensor | None]:
    """The next batch of rows from the stream, and their pixels when images are not cached; rows whose image
    does not decode are skipped (reported once per image, counted each time)."""
    rows: list[Row] = []
    pixels: list[Tensor] = []
    image_config = run.checkpoint.processors.image_config
    while len(rows) < run.config.batch_size:
        row = run.rows.rows[next(indices)]
        if run.cache is None:
            if row.image in bad:
                progress.skipped += 1
                continue
            try:
                pixels.append(
                    load_pixels(row.image, image_config, run.config.augment, run.generators.augment)
                )
            except Blip2Error as e:
                bad.add(row.image)
                progress.skipped += 1
                run.rows.report(str(e))
                continue
        rows.append(row)
    return rows, (torch.stack(pixels) if pixels else None)


def image_embeddings(run: Run, rows: list[Row], pixels: Tensor | None) -> Tensor:
    device = run.checkpoint.device
    if run.cache is not None:
        return torch.stack([run.cache[row.image] for row in rows])
    assert pixels is not None
    model = run.objective.model
    if "vision" in run.config.trainable:
        return model.encode_images(pixels.to(device))
    with torch.no_grad():
        return model.encode_images(pixels.to(device))


def to_device(batch: Any, device: torch.device) -> Any:
    return type(batch)(*(getattr(batch, f).to(device) for f in batch.__dataclass_fields__))


class LossLog:
    """losses.csv (one row per optimizer step) and, when asked, TensorBoard."""

    def __init__(self, run_dir: Path, keep_until: int, tensorboard: bool):
        self.file = run_dir / LOG_FILE
        kept: list[list[str]] = []
        if self.file.exists() and keep_until > 0:
            with open(self.file, newline="") as f:
                kept = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= keep_until]
        self.header: list[str] | None = None
        self.rows = kept
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "blip2 train: tensorboard is not installed; logging to losses.csv only", file=sys.stderr
                )
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.header is None:
            self.header = ["step", *values]
            with open(self.file, "w", newline="") as f:
                csv.writer(f).writerows([self.header, *self.rows])
        with open(self.file, "a", newline="") as f:
            csv.writer(f).writerow([step, *(f"{v:.6g}" for v in values.values())])
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)


def train_step(
    run: Run, indices: Iterator[int], progress: state.Progress, bad: set[Path]
) -> dict[str, float]:
    """One optimizer step over grad_accum micro-batches; returns the step's mean losses."""
    config, device = run.config, run.checkpoint.device
    lr = learning_rate(progress.step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    totals: dict[str, float] = {}
    for _ in range(config.grad_accum):
        rows, pixels = next_rows(run, indices, progress, bad)
        text = to_device(run.make_text(rows), device)
        with autocast(device, config.precision):
            embeds = image_embeddings(run, rows, pixels)
            out = run.objective(embeds, text, run.generators.negatives)
        (out["loss"] / config.grad_accum).backward()
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / config.grad_accum
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(run.trainable.values()), config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**totals, "lr": lr, "skipped": float(progress.skipped)}


def train(config: str | os.PathLike | Mapping[str, Any], resume: bool = False) -> Path:
    """Train one stage as `config` (a YAML path or a dict, see blip2.train.config) says; returns the folder of
    the exported checkpoint (run_dir/output). With `resume`, continue from the newest checkpoint in run_dir."""
    return run_training(load_config(config), resume)


def run_training(cfg: TrainConfig, resume: bool = False) -> Path:
    """`train` for a config already checked."""
    run, progress = prepare(cfg, resume)
    from tqdm import tqdm

    log = LossLog(cfg.run_dir, progress.step, cfg.tensorboard)
    position = Position(progress.epoch, progress.offset)
    indices = stream(run.rows.rows, cfg.seed, position)
    bad: set[Path] = set()
    bar = tqdm(
        total=cfg.steps,
        initial=progress.step,
        disable=not cfg.progress,
        desc=f"stage {cfg.stage}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    while progress.step < cfg.steps:
        values = train_step(run, indices, progress, bad)
        progress.step += 1
        progress.epoch, progress.offset = position.epoch, position.offset
        log.write(progress.step, {**values, "seconds": time.perf_counter() - started})
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        if progress.step % cfg.checkpoint_every == 0 or progress.step == cfg.steps:
            state.save(
                cfg.checkpoints, progress, run.trainable, run.optimizer, run.generators, cfg.keep_checkpoints
            )
    bar.close()
    return export(run.checkpoint.model, Path(cfg.model), cfg.output)
