"""Parity on an accelerator: our engine against transformers on the same tiny checkpoints, on one device.

    PYTHONPATH=src python benchmarks/device_check.py --device cuda      # on a GPU machine
    python benchmarks/device_check.py --device cpu                       # the same checks here

For each kind (BLIP-2 OPT / Flan-T5, InstructBLIP LLaMA, retrieval) and dtype it prints one line: the largest
difference of the image prefix (or ITM/ITC scores) and whether greedy and beam-search tokens are identical.
TF32 is switched off so that float32 means float32. Exits 1 when a float32 or float16 check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

import blip2
from blip2.models.registry import family
from blip2.tasks.captioning import make_options
from blip2.testing import build_checkpoint, build_instructblip_checkpoint, build_retrieval_checkpoint

PROMPTS = ["", "a photo of", "Question: how many dogs are there? Answer:"]


def images():
    rng = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(64, 80, 3, generator=rng) * 255).byte().numpy()) for _ in PROMPTS]


def check_generation(kind: str, path: Path, device: str, dtype: torch.dtype) -> bool:
    from transformers import (
        AutoProcessor,
        Blip2ForConditionalGeneration,
        InstructBlipForConditionalGeneration,
    )

    instruct = kind.startswith("instructblip")
    reference_class = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    hf = reference_class.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    ours = blip2.load(path, device=device, dtype=dtype)
    processor.tokenizer.padding_side = family(ours.config.text).padding_side
    prompts = [p or "describe" for p in PROMPTS] if instruct else PROMPTS
    inputs = processor(images=images(), text=prompts, return_tensors="pt", padding=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    ok = True
    with torch.no_grad():
        extra = {k: v for k, v in inputs.items() if k.startswith("qformer_")}
        expected = hf.get_image_features(inputs["pixel_values"], **extra).pooler_output
        prefix = ours.encode(inputs["pixel_values"], range(len(prompts)), prompts)
        diff = (prefix.float() - expected.float()).abs().max().item()
        results = []
        for options in (dict(num_beams=1), dict(num_beams=3)):
            out = hf.generate(**inputs, max_new_tokens=12, do_sample=False, **options)
            start = 1 if family(ours.config.text).is_encoder_decoder else inputs["input_ids"].shape[1]
            got = ours.generate_ids(prefix, prompts, make_options(dict(max_new_tokens=12, **options)))
            results.append(torch.equal(got.cpu(), out[:, start:].cpu()))
    ok = all(results)
    print(f"{kind:20s} {str(dtype):15s} prefix max diff {diff:.2e}  greedy {results[0]}  beam3 {results[1]}")
    return ok


def check_retrieval(path: Path, device: str, dtype: torch.dtype) -> bool:
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    hf = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = Blip2Processor.from_pretrained(path)
    ours = blip2.load(path, device=device, dtype=dtype)
    texts = ["a cat on a couch", "two dogs playing with a ball in the park", "an airplane"]
    inputs = processor(images=images(), text=texts, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        pixels = inputs["pixel_values"].to(dtype)
        itm = (
            hf(
                pixel_values=pixels,
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_image_text_matching_head=True,
            )
            .logits_per_image.float()
            .softmax(-1)[:, 1]
            .cpu()
        )
        itc = (
            hf(pixel_values=pixels, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            .logits_per_image.float()
            .cpu()
        )
    got_itm = torch.tensor(ours.match(images(), texts))
    got_itc = ours.similarity(images(), texts).float()
    d_itm, d_itc = (got_itm - itm).abs().max().item(), (got_itc - itc).abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    print(f"{'retrieval':20s} {str(dtype):15s} ITM max diff {d_itm:.2e}  ITC max diff {d_itc:.2e}")
    return max(d_itm, d_itc) < tolerance


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    root = Path(tempfile.mkdtemp())
    print(
        f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
        f"torch {torch.__version__}"
    )
    paths = {
        "blip2-opt": build_checkpoint(root / "opt", "opt"),
        "blip2-t5": build_checkpoint(root / "t5", "t5"),
        "instructblip-llama": build_instructblip_checkpoint(root / "llama", "llama"),
    }
    failed = []
    for kind, path in paths.items():
        dtypes = [torch.float32, torch.bfloat16] + ([] if kind == "blip2-t5" else [torch.float16])
        for dtype in dtypes:
            ok = check_generation(kind, path, args.device, dtype)
            # bfloat16: the reference runs the Q-Former in bfloat16, we keep float32 (see README): informative.
            if not ok and dtype != torch.bfloat16:
                failed.append(f"{kind} {dtype}")
    retrieval = build_retrieval_checkpoint(root / "retrieval")
    for dtype in (torch.float32, torch.float16):
        if not check_retrieval(retrieval, args.device, dtype):
            failed.append(f"retrieval {dtype}")
    print("FAILED: " + ", ".join(failed) if failed else "all float32 / float16 checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
