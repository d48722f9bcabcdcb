"""Peak memory and time of `blip2.load` against transformers' `from_pretrained`, on the same checkpoint.

    python benchmarks/load_memory.py --checkpoint DIR           # an existing checkpoint directory
    python benchmarks/load_memory.py                            # writes a ~0.6 GB random one first

Each load runs in a fresh process; the peak resident set size (VmHWM) is compared with the size of the
weights on disk. Building on the meta device and assigning tensors as they are read should peak near
1x the weights (plus the interpreter and torch, measured by an empty run). Every weight is read once after
loading, since safetensors may map the file lazily and untouched pages would not count.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import re, sys, time, torch
start = time.perf_counter()
model = None
if sys.argv[1] == "ours":
    import blip2
    model = blip2.load(sys.argv[2], device="cpu", dtype="float32").model
elif sys.argv[1] == "transformers":
    from transformers import Blip2ForConditionalGeneration
    model = Blip2ForConditionalGeneration.from_pretrained(sys.argv[2], dtype=torch.float32)
if model is not None:  # touch every weight: safetensors may map the file lazily
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())
elif sys.argv[1] == "baseline-ours":
    import blip2.tasks.api
elif sys.argv[1] == "baseline-transformers":
    from transformers import Blip2ForConditionalGeneration
# VmHWM: this process's peak RSS since exec (ru_maxrss would include the forking parent's).
peak_kb = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(peak_kb / 1024, time.perf_counter() - start)
"""


def run(kind: str, directory: Path) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(directory)], capture_output=True, text=True, check=True
    )
    peak_mb, seconds = map(float, out.stdout.split()[-2:])
    return peak_mb, seconds


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    directory = args.checkpoint or Path(tempfile.mkdtemp()) / "load-memory"
    if not (directory / "config.json").exists():
        from blip2.testing import build_checkpoint

        build_checkpoint(
            directory,
            "opt",
            num_query_tokens=32,
            vision=dict(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                image_size=224,
                patch_size=14,
            ),
            text=dict(
                hidden_size=1024,
                ffn_dim=4096,
                num_hidden_layers=8,
                num_attention_heads=16,
                vocab_size=32000,
                max_position_embeddings=512,
            ),
            std=0.02,
        )
    weights_mb = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20
    print(f"weights on disk: {weights_mb:.0f} MB")
    print("| loader | peak RSS (MB) | minus imports (MB) | x weights | seconds |\n|---|---|---|---|---|")
    for name in ("ours", "transformers"):
        base, _ = run(f"baseline-{name}", directory)
        peak, seconds = run(name, directory)
        print(
            f"| {name} | {peak:.0f} | {peak - base:.0f} | {(peak - base) / weights_mb:.2f} | {seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
