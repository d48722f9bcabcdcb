"""Training throughput of `blip2.train` on a demo-size model trained from scratch (CPU by default).

    python benchmarks/train_speed.py                       # stage 1 and 2, batch 32, 20 steps, best of 3
    python benchmarks/train_speed.py --device cuda --batch 128

The model (new_checkpoint): ViT 64 px / patch 8 (65 tokens) of width 96 x 4 layers, a Q-Former of width 96 x 4
layers with 16 queries, an OPT of width 128 x 4 layers; random images with short captions. Each configuration
trains --steps steps from a fresh run folder; the time of the whole `train` call (load, data, vision cache,
steps, checkpoint, export) and of the steps alone (from losses.csv's seconds column) are printed, best of
--repeats. Needs the `test` extra (the tiny tokenizers of blip2.testing).
"""

from __future__ import annotations

import argparse
import csv
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2.testing import bert_tokenizer, opt_tokenizer
from blip2.train import new_checkpoint, train

VISION = dict(
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
)
QFORMER = dict(
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    cross_attention_frequency=2,
    max_position_embeddings=64,
)
OPT = dict(
    model_type="opt",
    hidden_size=128,
    ffn_dim=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=96,
)
WORDS = ["red", "green", "blue", "circle", "square", "triangle", "star", "small", "large", "two", "three"]


def write_data(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a " + " ".join(rng.choice(WORDS, 5)) + "\n")


def write_checkpoints(root: Path) -> tuple[Path, Path]:
    bert, opt = bert_tokenizer(), opt_tokenizer()
    bert.save_pretrained(root / "bert")
    opt.save_pretrained(root / "opt-tok")
    image = {"size": {"height": 64, "width": 64}}
    retrieval = new_checkpoint(
        root / "stage1-init",
        {
            "vision_config": VISION,
            "qformer_config": {**QFORMER, "vocab_size": len(bert) + 8},
            "num_query_tokens": 16,
        },
        root / "bert",
        image,
    )
    text = {**OPT, "vocab_size": len(opt) + 8, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
    captioning = new_checkpoint(
        root / "stage2-init",
        {
            "vision_config": VISION,
            "qformer_config": {**QFORMER, "vocab_size": len(bert) + 8},
            "num_query_tokens": 16,
            "text_config": text,
        },
        root / "opt-tok",
        image,
    )
    return retrieval, captioning


def time_run(cfg: dict, run_dir: Path) -> tuple[float, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    train({**cfg, "run_dir": str(run_dir)})
    total = time.perf_counter() - start
    with open(run_dir / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    return total, float(rows[-1]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="train-speed-"))
    write_data(root / "data", 256)
    stage1, stage2 = write_checkpoints(root)
    common = dict(
        data=str(root / "data"),
        steps=args.steps,
        batch_size=args.batch,
        device=args.device,
        progress=False,
        checkpoint_every=args.steps,
        threads=args.threads,
    )
    cases = {
        "stage 1, vision trains": dict(
            stage=1, model=str(stage1), trainable=["vision", "qformer", "projections"]
        ),
        "stage 1, vision frozen (cached)": dict(stage=1, model=str(stage1)),
        "stage 2, LM trains": dict(
            stage=2, model=str(stage2), trainable=["qformer", "projections", "language_model"]
        ),
        "stage 2, LM frozen (cached vision)": dict(stage=2, model=str(stage2)),
    }
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}"
    )
    print("| configuration | best call (s) | best steps (s) | pairs / s (steps) |")
    print("|---|---|---|---|")
    for name, case in cases.items():
        times = [time_run({**common, **case}, root / "run") for _ in range(args.repeats)]
        total, steps = min(t[0] for t in times), min(t[1] for t in times)
        print(f"| {name} | {total:.2f} | {steps:.2f} | {args.steps * args.batch / steps:.0f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
