"""Decode speed of our engine alone: greedy captions of exactly --new-tokens tokens from an image prefix
computed once, so that the time is the language model's prefill and decode steps (what the static KV cache
changes), not the vision tower.

    python benchmarks/decode_speed.py --size mid-opt --batches 1 8 --checkpoint /tmp/mid-opt

It reads blip2 from the import path, so the same command under two PYTHONPATHs compares two versions of the
code on one checkpoint. Prints seconds per batch and captions per second (best of --repeats), and the
least process CPU time of a call. Random weights at the sizes of caption_speed.SIZES.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from caption_speed import SIZES, checkpoint

import blip2
from blip2.tasks.captioning import make_options


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="mid-opt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint directory, written if absent")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = SIZES[args.size]
    ours = blip2.load(checkpoint(args.size, args.checkpoint), device="cpu", dtype=torch.float32)
    n = args.new_tokens
    options = make_options(dict(num_beams=args.num_beams, max_new_tokens=n, min_new_tokens=n))
    size = spec["vision"]["image_size"]
    print(f"# {args.size}, greedy {n} tokens, beams {args.num_beams}, {torch.get_num_threads()} threads")
    for batch in args.batches:
        with torch.inference_mode():
            prefix = ours.encode(torch.randn(batch, 3, size, size))
        wall, cpu = best_of(lambda p=prefix: _decode(ours, p, options), args.repeats)
        print(
            f"batch {batch:3d}: {wall:7.3f} s   {batch / wall:7.2f} captions/s   cpu {cpu:7.3f} s",
            flush=True,
        )


def best_of(fn, repeats: int) -> tuple[float, float]:
    """Least wall-clock and least process CPU time of `repeats` calls after a warm-up. On a shared machine
    the wall clock also counts time spent waiting for a core; with --threads 1 the CPU time does not."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def _decode(ours, prefix: torch.Tensor, options) -> None:
    with torch.inference_mode():
        ours.generate_ids(prefix, [""] * prefix.shape[0], options)


if __name__ == "__main__":
    main()
