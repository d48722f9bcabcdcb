"""What the job tests share: the CLI run in-process, and a job's rows read back."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from blip2.cli import main

GEN = ["--beams", "2", "--max-new-tokens", "6"]


def run(capsys, *args):
    """`blip2 ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def read_rows(out: Path) -> list[dict]:
    """A job's rows: the lines of a .jsonl, or the parts of a .parquet folder."""
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_text().splitlines()]
    return ds.dataset(out, format="parquet").to_table().to_pylist()


def mixed_inputs(root: Path, photos: list[Path]) -> list[str]:
    """Inputs of every outcome: a folder of the photos with a truncated JPEG (an error row with its sha256)
    and a text file (a failed input) in it, and a tar shard of the first three photos."""
    import shutil

    from shards import write_shard

    folder = root / "library"
    folder.mkdir()
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpg").write_bytes(photos[0].read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image\n")
    write_shard(root / "shard.tar", photos[:3])
    return [str(folder), str(root / "shard.tar")]
