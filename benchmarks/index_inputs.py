"""What `index add` costs when nothing or little needs the model: the same JPEGs as files in a folder and as
one WebDataset tar shard, added once with a tiny retrieval checkpoint (the model's time is not the point),
then added again (a) unchanged, (b) with the shard rewritten around the same members (every member read and
hashed, none embedded: the shard's mtime changed).

    python benchmarks/index_inputs.py --images 2000 --size 320x240

Prints seconds (best of --repeats) per case.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import blip2
from blip2.index import Index
from blip2.testing import build_retrieval_checkpoint


def write_inputs(root: Path, count: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """`count` distinct JPEGs as files in a folder and as one tar shard of the same bytes."""
    rng = np.random.default_rng(0)
    folder = root / "files"
    folder.mkdir()
    with tarfile.open(root / "s.tar", "w") as tar:
        for i in range(count):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=80)
            data = out.getvalue()
            (folder / f"{i:06d}.jpg").write_bytes(data)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder, root / "s.tar"


def timed_add(index: Index, given: str) -> float:
    """Seconds one `index.add(given)` takes."""
    start = time.perf_counter()
    index.add(given)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(n) for n in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = blip2.load(build_retrieval_checkpoint(root / "tiny"), device="cpu")
        folder, shard = write_inputs(root, args.images, size)  # type: ignore[arg-type]
        for name, given in (("files", str(folder)), ("shard", str(shard))):
            index = Index(root / f"{name}.idx", model=model)
            first = timed_add(index, given)
            again = min(timed_add(index, given) for _ in range(args.repeats))
            print(f"{name}: first add {first:.2f} s (tiny model), unchanged re-add {again:.3f} s")
        index = Index(root / "shard.idx", model=model)
        seconds = []
        for repeat in range(args.repeats):
            os.utime(shard, (1e9 + repeat, 1e9 + repeat))  # same members, new mtime: read + hash, no model
            seconds.append(timed_add(index, str(shard)))
        assert index.add(str(shard)).embedded == 0
        touched = min(seconds)
        print(f"shard: touched re-add (every member read + hashed, none embedded) {touched:.3f} s")
        shutil.rmtree(root / "files")


if __name__ == "__main__":
    main()
