"""Input rate of a job without a model: expanding the inputs, reading each image once, hashing it and
decoding + resizing it to the model's input size, for the same JPEGs as files in a folder, as one WebDataset
tar shard, and as a parquet table of bytes; and, for files, the previous runner's way (hash the file, then
decode it from its path: two reads).

    python benchmarks/job_inputs.py --images 400 --size 640x480

Prints images/s (best of --repeats) per kind, in this thread (no decode pool), so it measures the
per-image cost that the decode threads or workers then divide.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from blip2.image_config import ImageProcessorConfig
from blip2.images import load_resized
from blip2.jobs.inputs import Item, expand_inputs


def write_inputs(root: Path, count: int, size: tuple[int, int]) -> dict[str, str]:
    """`count` JPEGs (smooth gradients plus noise: photo-like sizes) as files, one shard and one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    (root / "files").mkdir()
    blobs = []
    for i in range(count):
        x = np.linspace(0, 255, size[0])[None, :, None] * rng.uniform(0.3, 1.0, 3)
        pixels = (x + rng.normal(0, 12, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
        (root / "files" / f"{i:06d}.jpg").write_bytes(blobs[-1])
    with tarfile.open(root / "shard.tar", "w") as tar:
        for i, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    pq.write_table(pa.table({"jpg": blobs}), root / "table.parquet", row_group_size=256)
    return {
        "files": str(root / "files"),
        "tar": str(root / "shard.tar"),
        "parquet": str(root / "table.parquet"),
    }


def one_read(source: str, config: ImageProcessorConfig) -> int:
    items = [x for x in expand_inputs([source]) if isinstance(x, Item)]
    for item in items:
        data = item.read()
        hashlib.sha256(data).hexdigest()
        load_resized(data, config)
    return len(items)


def two_reads(source: str, config: ImageProcessorConfig) -> int:
    """The runner before jobs.inputs: the file hashed, then decoded from its path."""
    items = [x for x in expand_inputs([source]) if isinstance(x, Item)]
    for item in items:
        hashlib.sha256(Path(item.source).read_bytes()).hexdigest()
        load_resized(item.source, config)
    return len(items)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(n) for n in args.size.split("x"))
    config = ImageProcessorConfig(size=(224, 224))  # as BLIP-2 checkpoints
    with tempfile.TemporaryDirectory() as folder:
        sources = write_inputs(Path(folder), args.images, (size[0], size[1]))
        runs = [(kind, one_read, source) for kind, source in sources.items()]
        runs.append(("files, hashed then decoded (two reads)", two_reads, sources["files"]))
        for kind, read, source in runs:
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                count = read(source, config)
                best = min(best, time.perf_counter() - start)
            print(f"{kind:40s} {count / best:8.1f} images/s  ({count} in {best:.2f} s)")


if __name__ == "__main__":
    main()
