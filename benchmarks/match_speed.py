"""Retrieval throughput: `embed_images` (images/s) and `match` (ITM pairs/s), ours against transformers'
Blip2ForImageTextRetrieval on identical (random) weights.

    python benchmarks/match_speed.py --size mid --batches 1 8 64        # CPU
    python benchmarks/match_speed.py --size itm-vit-g --device cuda --dtype float16

Images are preprocessed already; texts are tokenized once, outside the timed region, for both engines.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from caption_speed import MID_QFORMER, MID_VISION, QFORMER_BASE, VIT_G, _machine, time_call

import blip2
from blip2.testing import build_retrieval_checkpoint

SIZES = {
    "mid": dict(vision=MID_VISION, qformer={**MID_QFORMER, "num_hidden_layers": 6}),
    "itm-vit-g": dict(vision=VIT_G, qformer=QFORMER_BASE),
}
TEXT = "a group of people standing around a large clock tower"


def embed_ours(ours, pixels: torch.Tensor) -> torch.Tensor:
    """Our ITC image embeddings of preprocessed `pixels`: vision tower, Q-Former, projection."""
    m = ours.model
    return m.project_images(m.query(m.encode_images(pixels)))


def embed_hf(hf, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' ITC image embeddings. Its retrieval model has no image-only call: the ITC path also runs
    a text, given the shortest one here ([CLS], the first token of `ids`)."""
    return hf(pixel_values=pixels, input_ids=ids[:, :1], attention_mask=mask[:, :1]).image_embeds


def measure(ours, hf, processor, batch, device, dtype, repeats) -> list[float]:
    """[ours embed img/s, transformers embed img/s, ours match pairs/s, transformers match pairs/s]."""
    size = ours.image_config.size[0]
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    text = processor.tokenizer([TEXT] * batch, return_tensors="pt", padding=True)
    ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)
    m = ours.model

    def ours_embed():
        return embed_ours(ours, pixels)

    def hf_embed():
        return embed_hf(hf, pixels, ids, mask)

    def ours_match():
        return m.itm_logits(m.multimodal_features(m.encode_images(pixels), ids, mask))

    def hf_match():
        return hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)

    with torch.inference_mode():
        return [batch / time_call(f, repeats) for f in (ours_embed, hf_embed, ours_match, hf_match)]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()

    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    directory = args.checkpoint or Path(tempfile.mkdtemp()) / args.size
    if not (directory / "config.json").exists():
        spec = SIZES[args.size]
        build_retrieval_checkpoint(
            directory, num_query_tokens=32, vision=spec["vision"], qformer=spec["qformer"], std=0.02
        )
    dtype = blip2.loading.loader.parse_dtype(args.dtype, torch.device(args.device))
    ours = blip2.load(directory, device=args.device, dtype=dtype)
    hf = Blip2ForImageTextRetrieval.from_pretrained(directory, dtype=dtype).to(args.device).eval()
    processor = Blip2Processor.from_pretrained(directory)

    print(f"# {args.size}, {args.dtype}, {args.device}: {_machine(args.device)}, torch {torch.__version__}")
    print(
        "| batch | embed_images ours (img/s) | transformers | ratio | match ours (pairs/s) | transformers | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        rates = measure(ours, hf, processor, batch, args.device, dtype, args.repeats)
        print(
            f"| {batch} | {rates[0]:.2f} | {rates[1]:.2f} | {rates[0] / rates[1]:.2f}x "
            f"| {rates[2]:.2f} | {rates[3]:.2f} | {rates[2] / rates[3]:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
