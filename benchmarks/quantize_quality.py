"""What quantization costs and saves: the same checkpoint loaded in float and with `quantize=`.

    python benchmarks/quantize_quality.py                       # int8 on CPU: tiny fixtures + mid-size models
    python benchmarks/quantize_quality.py --modes int8 int8-all     # also the vision tower and Q-Former
    python benchmarks/quantize_quality.py --device cuda --dtype float16 --modes int8 int4 --sizes opt-2.7b

For each checkpoint (the test suite's tiny fixtures, and caption_speed.py's sizes with random weights):
- weight bytes (parameters and buffers, tied ones once) in float and quantized;
- token match: greedy decoding of exactly --new-tokens tokens from the same random images, the share of
  positions where the quantized model picks the float model's token;
- next-token agreement: along the float model's greedy path (both fed the float model's tokens), the share
  of steps where both pick the same next token (one early disagreement does not count again later);
- logit cosine: the cosine between float and quantized next-token logits along the float model's greedy
  path (the quantized model is fed the float model's tokens), mean and minimum over rows and steps;
- margin: the float model's top-1 minus top-2 logit along its greedy path, as a share of the logits'
  standard deviation, 10th percentile and median: where it is near 0 (random weights), any perturbation
  flips the pick, so the token match measures the fixture as much as the quantization;
- speed (--speed-size only): seconds for a batch of --speed-batch greedy captions, best of --repeats;
  with --cpu-seconds, CPU seconds (time.process_time) in one thread instead of wall-clock seconds: on a
  shared machine other processes disturb those far less.
With --memory-sizes (default: the released opt-2.7b and flan-t5-xl), the weight bytes of those sizes in
--dtype and quantized, counted on the meta device: a config alone, no weights, so any machine can.
Needs the `test` extra (transformers writes the checkpoints).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from caption_speed import NUM_QUERY_TOKENS, SIZES, _machine, checkpoint, time_call

import blip2
from blip2.loading.loader import build_on_meta, parse_dtype, read_model_config
from blip2.loading.quantize import MODES, quantize_linears, weight_bytes
from blip2.loading.weights import dtype_plan
from blip2.tasks.captioning import make_options
from blip2.testing import build_checkpoint, build_instructblip_checkpoint

# The test suite's fixtures (tests/conftest.py `checkpoints`, `instruct_checkpoints`), as it builds them.
TINY = {
    "tiny-opt": lambda d: build_checkpoint(d, "opt"),
    "tiny-opt-sharded": lambda d: build_checkpoint(d, "opt", sharded=True, seed=1),
    "tiny-t5": lambda d: build_checkpoint(d, "t5"),
    "tiny-t5-sharded": lambda d: build_checkpoint(d, "t5", sharded=True, seed=1),
    "tiny-instruct-opt": lambda d: build_instructblip_checkpoint(d, "opt"),
    "tiny-instruct-t5": lambda d: build_instructblip_checkpoint(d, "t5"),
    "tiny-instruct-llama": lambda d: build_instructblip_checkpoint(d, "llama"),
}


def write_checkpoint(name: str, directory: Path) -> Path:
    """A checkpoint directory for `name`: a tiny fixture or one of caption_speed.py's sizes."""
    return TINY[name](directory) if name in TINY else checkpoint(name, directory)


def meta_weight_bytes(size: str, dtype: torch.dtype, modes: list[str]) -> dict[str, int]:
    """Weight bytes of caption_speed.py's `size` in `dtype` (key "float") and quantized in each of `modes`,
    counted on models built on the meta device from the config alone."""
    from transformers import Blip2Config

    spec: dict[str, Any] = SIZES[size]
    text = {"model_type": spec["lm"], **spec["text"]}
    if spec["lm"] == "t5":
        text |= {"tie_word_embeddings": False, "decoder_start_token_id": 0}  # Flan-T5 has its own head
    directory = Path(tempfile.mkdtemp())
    Blip2Config(
        vision_config=spec["vision"],
        qformer_config=spec["qformer"],
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
    ).save_pretrained(directory)
    config, model_class = read_model_config(directory)
    plan = dtype_plan(config, dtype)
    sizes = {}
    for mode in ["float", *modes]:
        model = build_on_meta(model_class, config)
        for name, parameter in model.named_parameters():
            parameter.data = parameter.data.to(plan(name))
        if mode != "float":
            quantize_linears(model, MODES[mode])
        sizes[mode] = weight_bytes(model)
    return sizes


def random_pixels(model, batch: int, device: str, seed: int = 0) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


@torch.inference_mode()
def agreement(ref, quant, pixels: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Token match rate of greedy decoding, and logit cosine along the reference's greedy path."""
    prompts = [""] * len(pixels)
    options = make_options(dict(num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
    ids_ref = ref.generate_ids(ref.encode(pixels), prompts, options)
    ids_quant = quant.generate_ids(quant.encode(pixels), prompts, options)
    steppers = [m.stepper(m.encode(pixels), prompts)[0] for m in (ref, quant)]
    logits = [(steppers[0].prefill(new_tokens), steppers[1].prefill(new_tokens))]
    for step in range(ids_ref.shape[1] - 1):
        tokens = ids_ref[:, step]
        logits.append((steppers[0].step(tokens), steppers[1].step(tokens)))
    cos = torch.stack([F.cosine_similarity(a, b, dim=-1) for a, b in logits])
    ref_logits = torch.stack([a for a, _ in logits]).float()  # (steps, N, V)
    top2 = ref_logits.topk(2, dim=-1).values
    margin = ((top2[..., 0] - top2[..., 1]) / ref_logits.std(-1)).flatten()
    top1 = torch.stack([a.argmax(-1) == b.argmax(-1) for a, b in logits])
    return {
        "match": (ids_ref == ids_quant).float().mean().item(),
        "top1": top1.float().mean().item(),
        "cos_mean": cos.mean().item(),
        "cos_min": cos.min().item(),
        "margin_p10": margin.quantile(0.1).item(),
        "margin_median": margin.median().item(),
    }


def cpu_time_call(fn, repeats: int) -> float:
    """Like caption_speed.time_call (best of `repeats` after a warm-up), in CPU seconds of this process."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def caption_seconds(model, pixels: torch.Tensor, new_tokens: int, repeats: int, cpu: bool = False) -> float:
    """Best-of-`repeats` seconds to encode and greedily caption `pixels` with exactly `new_tokens` tokens."""
    prompts = [""] * len(pixels)
    options = make_options(dict(num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens))

    def run():
        with torch.inference_mode():
            return model.generate_ids(model.encode(pixels), prompts, options)

    return (cpu_time_call if cpu else time_call)(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="*", default=[*TINY, "mid-opt", "mid-t5"])
    parser.add_argument("--modes", nargs="+", default=["int8"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--speed-size", default="mid-opt", help="the size whose speed is timed ('' for none)")
    parser.add_argument("--speed-batch", type=int, default=8)
    parser.add_argument("--cpu-seconds", action="store_true", help="time CPU seconds in one thread")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-sizes", nargs="*", default=["opt-2.7b", "flan-t5-xl"])
    args = parser.parse_args()
    if args.cpu_seconds:
        torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp())
    print(f"# {args.device}, {args.dtype}: {_machine(args.device)}, torch {torch.__version__}")
    print(
        "| checkpoint | mode | weight MB float | weight MB quant | token match | next-token agreement "
        "| logit cos mean | min | margin p10 | margin median | s/batch float | s/batch quant |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sizes:
        for row in compare(name, write_checkpoint(name, root / name), args):
            print(row, flush=True)
    dtype = parse_dtype(args.dtype, torch.device(args.device))
    if args.memory_sizes:
        print(
            f"\n| size ({args.dtype}, meta device) | "
            + " | ".join(f"GiB {m}" for m in ["float", *args.modes])
            + " |"
        )
        print("|---|" + "---|" * (1 + len(args.modes)))
    for size in args.memory_sizes:
        sizes = meta_weight_bytes(size, dtype, args.modes)
        print(f"| {size} | " + " | ".join(f"{b / 2**30:.2f}" for b in sizes.values()) + " |", flush=True)


def compare(name: str, directory: Path, args: argparse.Namespace) -> Iterator[str]:
    """One table row per quantization mode: the checkpoint in float against the same one quantized."""
    ref = blip2.load(directory, device=args.device, dtype=args.dtype)
    pixels = random_pixels(ref, args.images, args.device)
    timed = name == args.speed_size
    batch = pixels[: args.speed_batch]
    float_s = caption_seconds(ref, batch, args.new_tokens, args.repeats, args.cpu_seconds) if timed else 0.0
    for mode in args.modes:
        quant = blip2.load(directory, device=args.device, dtype=args.dtype, quantize=mode)
        stats = agreement(ref, quant, pixels, args.new_tokens)
        if timed:
            quant_s = caption_seconds(quant, batch, args.new_tokens, args.repeats, args.cpu_seconds)
            speed = f"{float_s:.3f} | {quant_s:.3f}"
        else:
            speed = "- | -"
        yield (
            f"| {name} | {mode} | {weight_bytes(ref.model) / 2**20:.2f} "
            f"| {weight_bytes(quant.model) / 2**20:.2f} | {stats['match']:.3f} | {stats['top1']:.3f} "
            f"| {stats['cos_mean']:.5f} | {stats['cos_min']:.5f} | {stats['margin_p10']:.3f} "
            f"| {stats['margin_median']:.3f} | {speed} |"
        )


if __name__ == "__main__":
    main()
