"""Batch job speed: images/s of a caption job (`blip2 caption PHOTOS --out FILE`) on the mid-size model with
--workers 0, 1, 2 (decoding in the main thread, in 1 or 2 worker processes) and with the default decode
threads, and the decode + preprocess rate alone (what the model would wait for).

    python benchmarks/job_speed.py                                  # CPU: 64 photos, mid-opt, a few minutes
    python benchmarks/job_speed.py --images 256 --workers 0 2 4 8 --device cuda --batch-size 64

The photos are JPEGs of --photo-size (default 1024x768, a typical camera export scaled down), written once
with content that compresses like a photo. Each job writes a fresh output (parquet) through the real runner
(`blip2.jobs.run_job`, hashing, decoding, batching, committing chunks), with the model loaded once before;
each figure is the best of --repeats runs (see caption_speed.time_call for why the minimum). The decode rows
time `DecodePool.map` (processes) or `prepare` in turn (0) over every photo, the pool's start excluded.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import engine_speed
import torch
from caption_speed import _machine, checkpoint

import blip2
from blip2.images import load_resized, to_tensor
from blip2.jobs import Job, open_job, run_job
from blip2.jobs.decode import DecodePool
from blip2.tasks.captioning import make_options


def caption_job_rate(pipe, photos: Path, workers: int | None, tokens: int, repeats: int) -> float:
    """Images/s of a greedy caption job over the folder `photos`, each run into a fresh output."""
    options = make_options(dict(num_beams=1, max_new_tokens=tokens, min_new_tokens=tokens))
    job = Job("caption", "mid", {"tokens": tokens}, {"caption": "string"})
    count = len(list(photos.iterdir()))
    best = float("inf")
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp()) / "captions.parquet"
        start = time.perf_counter()
        summary = run_job(
            [str(photos)],
            open_job(str(out), job),
            job,
            functools.partial(load_resized, config=pipe.image_config),
            lambda good: [{"caption": c} for c in pipe.caption(good, generation=options)],
            batch_size=pipe.batch_size,
            workers=workers,
        )
        best = min(best, time.perf_counter() - start)
        assert summary.done == count, summary.line()
        shutil.rmtree(out.parent)
    return count / best


def decode_rate(paths: list[Path], config, workers: int, repeats: int) -> float:
    """Images/s of decoding and preprocessing alone: the model-size image from each file, then its pixel
    tensor (in this process, as the job does), in turn (0) or in a pool of `workers` processes."""
    prepare = functools.partial(load_resized, config=config)
    best = float("inf")
    pool = DecodePool(prepare, workers, ahead=64) if workers else None
    try:
        if pool is not None:
            list(pool.map(paths[:workers]))  # the processes started and warm
        for _ in range(repeats):
            start = time.perf_counter()
            images = pool.map(paths) if pool is not None else map(prepare, paths)
            for image in images:
                to_tensor(image, config)
            best = min(best, time.perf_counter() - start)
    finally:
        if pool is not None:
            pool.close()
    return len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="mid-opt", choices=["mid-opt", "mid-t5"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--photo-size", type=int, nargs=2, default=[1024, 768], metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, help="reuse a checkpoint directory written before")
    args = parser.parse_args()

    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp())
    engine_speed.FILE_SIZE = tuple(args.photo_size)  # write_jpegs' size
    photos = root / "photos"
    photos.mkdir()
    paths = engine_speed.write_jpegs(photos, args.images)
    pipe = blip2.load(checkpoint(args.size, args.checkpoint or root / args.size), device=args.device)
    pipe.batch_size = args.batch_size
    config = pipe.image_config
    pipe.caption([str(p) for p in paths[: args.batch_size]], max_new_tokens=args.new_tokens)  # warm-up
    machine = f"{_machine(args.device)}, torch {torch.__version__}, {os.cpu_count()} cores"
    print(f"# {args.size}, {args.device}: {machine}")
    print(
        f"# {args.images} JPEGs of {args.photo_size[0]}x{args.photo_size[1]}, batch {args.batch_size}, ",
        end="",
    )
    print(f"greedy {args.new_tokens} new tokens, best of {args.repeats}; load average before {load_before}")

    rows = []
    for workers in [*args.workers, None]:
        label = "default (decode threads)" if workers is None else str(workers)
        rate = caption_job_rate(pipe, photos, workers, args.new_tokens, args.repeats)
        decoded = decode_rate(paths, config, workers, args.repeats) if workers is not None else None
        rows.append((label, rate, decoded))
        print(
            f"  workers {label}: job {rate:.2f} img/s"
            + (f", decode alone {decoded:.1f} img/s" if decoded else "")
        )
    print("\n| --workers | caption job (img/s) | decode + preprocess alone (img/s) |\n|---|---|---|")
    for label, rate, decoded in rows:
        print(f"| {label} | {rate:.2f} | {'' if decoded is None else f'{decoded:.1f}'} |")
    print(f"\nload average after: {os.getloadavg()}")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
