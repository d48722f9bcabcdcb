"""Writing embeddings to disk with the image paths they belong to: .npy (+ FILE.paths.txt) or .parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

FORMATS = (".npy", ".parquet")


def check_output_path(out: str | Path) -> Path:
    """Refuse an unsupported extension or a missing folder before any work is done."""
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"--out {out}: use a .npy or .parquet file name")
    if not path.parent.exists():
        raise InputError(f"--out {out}: the folder {path.parent} does not exist")
    if path.suffix.lower() == ".parquet":
        _pyarrow()
    return path


def write_embeddings(out: str | Path, paths: list[str], vectors: list[np.ndarray]) -> tuple[int, ...]:
    """Write (N, ...) float32 embeddings; row i belongs to paths[i]. Returns the array's shape.

    .npy: the array, and the paths one per line in FILE.paths.txt. .parquet: columns `image` (string) and
    `embedding` (a fixed-size list of float32, flattened row-major) plus the shape in the schema metadata.
    """
    path = check_output_path(out)
    array = np.stack(vectors).astype(np.float32)
    if path.suffix.lower() == ".npy":
        np.save(path, array)
        path.with_name(path.name + ".paths.txt").write_text("".join(p + "\n" for p in paths))
        return array.shape
    pa, pq = _pyarrow()
    flat = array.reshape(len(array), -1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    table = pa.table({"image": pa.array(paths, pa.string()), "embedding": column})
    table = table.replace_schema_metadata({"shape": ",".join(map(str, array.shape[1:]))})
    pq.write_table(table, path)
    return array.shape


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read back what write_embeddings wrote: (paths, array)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        paths = path.with_name(path.name + ".paths.txt").read_text().splitlines()
        return paths, np.load(path)
    _, pq = _pyarrow()
    table = pq.read_table(path)
    shape = tuple(int(x) for x in table.schema.metadata[b"shape"].decode().split(","))
    flat = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    return table.column("image").to_pylist(), flat.reshape(len(table), *shape)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            "writing .parquet needs pyarrow: pip install 'blip2[parquet]' (or use .npy)"
        ) from None
    return pa, pq
