"""Captioning throughput: our engine against transformers on identical (random) weights.

    python benchmarks/caption_speed.py --size mid --batches 1 8 64            # CPU, a mid-size model
    python benchmarks/caption_speed.py --size opt-2.7b --device cuda --dtype float16
    python benchmarks/caption_speed.py --size flan-t5-xl --device cuda --dtype bfloat16

Greedy decoding of exactly --new-tokens tokens (min = max, so random weights cannot stop early and both
engines do the same work), images already preprocessed, best of --repeats runs (see time_call). Prints one line per batch size and a markdown table
for benchmarks/RESULTS.md. Needs the `test` extra (transformers) to write the checkpoint and run the reference.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import blip2
from blip2.tasks.captioning import make_options
from blip2.testing import build_checkpoint

# The released towers: EVA ViT-g at 224 px and the BERT-base Q-Former.
VIT_G = dict(
    hidden_size=1408,
    intermediate_size=6144,
    num_hidden_layers=39,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
)
QFORMER_BASE = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
    vocab_size=30522,
)
# CPU-friendly towers with the same layout (257 image tokens, 32 queries).
MID_VISION = dict(
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    image_size=224,
    patch_size=14,
)
MID_QFORMER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
T5_BUCKETS = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128)

SIZES = {
    "mid-opt": dict(
        lm="opt",
        vision=MID_VISION,
        qformer=MID_QFORMER,
        text=dict(
            hidden_size=512,
            ffn_dim=2048,
            num_hidden_layers=6,
            num_attention_heads=8,
            vocab_size=8192,
            max_position_embeddings=512,
        ),
    ),
    "mid-t5": dict(
        lm="t5",
        vision=MID_VISION,
        qformer=MID_QFORMER,
        text=dict(
            d_model=512,
            d_kv=64,
            d_ff=1024,
            num_layers=6,
            num_decoder_layers=6,
            num_heads=8,
            vocab_size=8192,
            **T5_BUCKETS,
        ),
    ),
    # The released sizes (random weights): for a GPU.
    "opt-2.7b": dict(
        lm="opt",
        vision=VIT_G,
        qformer=QFORMER_BASE,
        text=dict(
            hidden_size=2560,
            ffn_dim=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=50304,
            max_position_embeddings=2048,
        ),
    ),
    "flan-t5-xl": dict(
        lm="t5",
        vision=VIT_G,
        qformer=QFORMER_BASE,
        text=dict(
            d_model=2048,
            d_kv=64,
            d_ff=5120,
            num_layers=24,
            num_decoder_layers=24,
            num_heads=32,
            vocab_size=32128,
            **T5_BUCKETS,
        ),
    ),
}
NUM_QUERY_TOKENS = 32


def time_call(fn, repeats: int) -> float:
    """Best of `repeats` timed calls after one warm-up, in seconds. The minimum, because on a shared VM the
    spread between runs of the same call (seen here: 0.41 s to 0.77 s) is far larger than the differences
    measured; the minimum is the run least disturbed."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(ours, hf, spec, batch, args, dtype, options) -> tuple[float, float]:
    """Images/s of both engines captioning `batch` preprocessed images with an empty prompt."""
    size = spec["vision"]["image_size"]
    pixels = torch.randn(batch, 3, size, size, device=args.device)
    prompts = [""] * batch
    input_ids, mask = hf_prompt_inputs(ours, prompts, args.device)

    def run_ours():
        with torch.inference_mode():
            return ours.generate_ids(ours.encode(pixels), prompts, options)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(
                pixel_values=pixels.to(dtype),
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
            )

    return batch / time_call(run_ours, args.repeats), batch / time_call(run_hf, args.repeats)


def hf_prompt_inputs(ours, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input_ids and attention_mask for `prompts` after the image placeholders, tokenized by
    our engine `ours` (the same tokenizer files) and padded on the side its language model pads."""
    batch, q = len(prompts), ours.config.num_query_tokens
    ids = ours.text.batch(prompts, "left" if ours.family != "t5" else "right")
    input_ids = torch.cat([torch.full((batch, q), ours.config.image_token_index), ids.ids], 1).to(device)
    mask = torch.cat([torch.ones(batch, q, dtype=torch.long), ids.mask], 1).to(device)
    return input_ids, mask


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="mid-opt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, help="reuse a checkpoint directory written before")
    args = parser.parse_args()

    from transformers import Blip2ForConditionalGeneration

    spec = SIZES[args.size]
    directory = checkpoint(args.size, args.checkpoint)
    dtype = blip2.loading.loader.parse_dtype(args.dtype, torch.device(args.device))
    ours = blip2.load(directory, device=args.device, dtype=dtype)
    hf = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(args.device).eval()
    options = make_options(dict(num_beams=1, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens))

    rows = []
    print(f"# {args.size}, {args.dtype}, {args.device}: {_machine(args.device)}, torch {torch.__version__}")
    for batch in args.batches:
        rate_ours, rate_hf = measure(ours, hf, spec, batch, args, dtype, options)
        rows.append((batch, rate_ours, rate_hf))
        print(
            f"batch {batch:3d}: ours {rate_ours:8.2f} img/s   transformers {rate_hf:8.2f} img/s   "
            f"ratio {rate_ours / rate_hf:5.2f}x",
            flush=True,
        )
    print("\n| batch | ours (img/s) | transformers (img/s) | ratio |\n|---|---|---|---|")
    for batch, a, b in rows:
        print(f"| {batch} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


def checkpoint(size: str, directory: Path | None) -> Path:
    """A checkpoint of random weights at `size` in `directory` (a new temporary one if None), written
    unless it is there already."""
    spec = SIZES[size]
    directory = directory or Path(tempfile.mkdtemp()) / size
    if not (directory / "config.json").exists():
        build_checkpoint(
            directory,
            spec["lm"],
            num_query_tokens=NUM_QUERY_TOKENS,
            vision=spec["vision"],
            qformer=spec["qformer"],
            text=spec["text"],
            std=0.02,
        )
    return directory


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
